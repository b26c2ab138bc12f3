"""Revocation latency and upstream requests per download (run by hand, not in CI).

    .venv/bin/python benchmarks/revocation.py [--samples 200] [--couchdb pouchdb|release|URL]

Starts the server (see ``benchmarks/servers.py``) and two ``twist couchtoken``
processes (cached, and ``--cache-size 0``), each behind a recording proxy.  For each sample it
writes a new token to CouchDB, then polls the old link until it answers 403:
the time from CouchDB's acknowledgement to the first 403 is the revocation
latency.  Then it counts the requests that reach CouchDB per download.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import treq
from twisted.internet import task
from twisted.internet.defer import ensureDeferred

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import add_server_options, couchdb_server, describe  # noqa: E402
from couchtoken.dev.pouchdb import CouchAdmin  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.twistproc import TwistProcess  # noqa: E402

DB, DOC, FILE = "bench-revocation", "doc", "f.bin"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def put_token(admin: CouchAdmin, token: str) -> None:
    """Write a new token (async, so the proxies keep running) and wait for CouchDB's ack."""
    url = f"{admin.base_url}/{DB}/{DOC}"
    auth = (admin.user or "", admin.password or "")
    current = await (await treq.get(url, auth=auth)).json()
    current["download_token"] = token
    response = await treq.put(
        url, json.dumps(current).encode(), auth=auth, headers={"Content-Type": "application/json"}
    )
    assert response.code == 201, response.code
    await response.content()


async def status(url: str) -> int:
    response = await treq.get(url, persistent=True)
    await response.content()
    return response.code


async def upstream_per_download(proxy: FaultProxy, url: str, downloads: int = 100) -> float:
    for _ in range(3):
        await status(url)  # warm
    before = len(proxy.requests)
    for _ in range(downloads):
        assert await status(url) == 200
    return (len(proxy.requests) - before) / downloads


async def main(reactor, samples: int, choice: str, start_script: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="couchtoken-bench-"))
    with couchdb_server(choice, work, start_script) as url:
        print(f"server: {describe(choice)}")
        await measure(reactor, samples, CouchAdmin(url), work)


async def measure(reactor, samples: int, admin: CouchAdmin, work: Path) -> None:
    if admin.request("GET", f"/{DB}")[0] == 200:
        admin.delete_db(DB)
    admin.create_db(DB)
    admin.put(DB, DOC, {"download_token": "t-0"})
    admin.put_attachment(DB, DOC, FILE, b"x" * 1024)
    services = []
    try:
        urls, proxies = {}, {}
        for name, extra in (("cached", []), ("uncached", ["--cache-size", "0"])):
            proxy = FaultProxy(reactor, admin.host, admin.port)
            port = await proxy.start()
            user, password = admin.user or "", admin.password or ""
            service = TwistProcess(
                work / f"{name}.log",
                extra + ["--max-failures", "0"],
                env={"COUCHDB_URL": f"http://{quote(user)}:{quote(password)}@127.0.0.1:{port}"},
            )
            service.start()
            services.append(service)
            urls[name], proxies[name] = f"{service.base_url}/{DB}/{DOC}/{FILE}", proxy

        cached = urls["cached"]
        latencies = []
        token = "t-0"
        for i in range(samples):
            # Warm: the document is cached once two lookups in a row reach CouchDB no more.
            while True:
                seen = len(proxies["cached"].requests)
                assert await status(f"{cached}?token={token}") == 200
                if not [t for t in proxies["cached"].targets()[seen:] if f"/{DOC}?att" in t]:
                    break
                await task.deferLater(reactor, 0.05)
            old, token = token, f"t-{i + 1}"
            await put_token(admin, token)
            acked = time.perf_counter()
            while await status(f"{cached}?token={old}") != 403:
                pass
            latencies.append((time.perf_counter() - acked) * 1000)
        per_cached = await upstream_per_download(proxies["cached"], f"{cached}?token={token}")
        per_uncached = await upstream_per_download(proxies["uncached"], f"{urls['uncached']}?token={token}")
        print(
            f"revocation latency over {samples} samples (ms): "
            f"p50 {percentile(latencies, 0.5):.1f}  p99 {percentile(latencies, 0.99):.1f}  "
            f"max {max(latencies):.1f}"
        )
        print(
            f"requests reaching CouchDB per warm download: cached {per_cached:.2f}, "
            f"uncached (--cache-size 0) {per_uncached:.2f}"
        )
    finally:
        for service in services:
            service.stop()
        admin.delete_db(DB)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200)
    add_server_options(parser)
    arguments = parser.parse_args()
    task.react(
        lambda reactor: ensureDeferred(
            main(reactor, arguments.samples, arguments.couchdb, arguments.couchdb_start)
        )
    )
