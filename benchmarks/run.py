"""couchtoken against CouchDB itself and against its own uncached path (run by hand, not in CI).

    .venv/bin/python benchmarks/run.py [--seconds 5] [--rounds 2] [--memory-mib 256]
        [--couchdb pouchdb|release|URL]

Needs ``wrk`` (Debian package ``wrk``).  Starts the server (PouchDB Server by
default, a real CouchDB 3.5 with ``--couchdb release``: ``benchmarks/servers.py``) and two
``twist couchtoken`` processes, seeds a 1 KiB and an 8 MiB attachment, and
measures three targets in one run, alternating them (A B C A B C) so machine
drift cancels out:

- direct: CouchDB serving the attachment itself (admin credentials, no
  token check): the natural limit;
- couchtoken: the service with its caches warm;
- uncached: the same service with ``--cache-size 0 --blob-cache-bytes 0``,
  a document round trip per download, as the classic design does.

Then warm 1 KiB downloads over TLS from a third service on an ``ssl:``
port, HTTP/1.1 (``wrk``, 50 connections) against HTTP/2 (``h2load``,
Debian's ``nghttp2-client``: 4 connections of 50 concurrent streams),
alternated the same way; skipped if ``h2load`` is missing.

Then a memory case: ten clients reading a large attachment at 100 KB/s,
and the service's RSS growth.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import add_server_options, couchdb_server, describe  # noqa: E402
from couchtoken.dev.pouchdb import CouchAdmin  # noqa: E402
from tests.twistproc import TwistProcess, rss_bytes  # noqa: E402

DB, DOC, TOKEN = "bench", "doc", "bench-token"
SMALL, LARGE, HUGE = "small.bin", "large.bin", "huge.bin"
TARGETS = ("direct", "couchtoken", "uncached")


def wrk(url: str, connections: int, seconds: int, headers: list[str]) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for header in headers:
        command += ["-H", header]
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[transfer.group(2)]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    p99_ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "mbps": float(transfer.group(1)) * scale,
        "p99_ms": p99_ms,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def h2load(url: str, connections: int, streams: int, seconds: int) -> dict[str, float]:
    """HTTP/2 load: ``connections`` connections of ``streams`` concurrent streams for ``seconds``."""
    command = ["h2load", f"-c{connections}", f"-m{streams}", f"-D{seconds}", "--warm-up-time=1", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "Application protocol: h2" in out, out
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\b", out)
    return {
        "rps": float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1)),
        "mean_ms": float(mean.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)],
        "non2xx": sum(int(n) for n in codes.groups()) + sum(int(n) for n in failed.groups()),
    }


def status_of(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def slow_reader(port: int, path: str, seconds: float, rate: int, results: list[int]) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += len(sock.recv(rate // 20))
        time.sleep(0.05)
    sock.close()
    results.append(got)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="A B C rounds per case (medians are reported)")
    parser.add_argument(
        "--memory-mib",
        type=int,
        default=64,
        help="attachment size for the memory case (0 skips it); PouchDB Server 4.2 fails above ~100 MiB",
    )
    parser.add_argument(
        "--cases", default="", help="comma-separated case prefixes to run, e.g. 1,tls (default: all)"
    )
    add_server_options(parser)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="couchtoken-bench-"))
    try:
        with couchdb_server(args.couchdb, work, args.couchdb_start) as url:
            print(f"server: {describe(args.couchdb)}")
            run(args, CouchAdmin(url), url, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, admin: CouchAdmin, url: str, work: Path) -> None:
    services: list[TwistProcess] = []
    try:
        if admin.request("GET", f"/{DB}")[0] == 200:
            admin.delete_db(DB)
        admin.create_db(DB)
        admin.put(DB, DOC, {"download_token": TOKEN})
        admin.put_attachment(DB, DOC, SMALL, os.urandom(1024))
        admin.put_attachment(DB, DOC, LARGE, os.urandom(8 * 1024 * 1024))
        digest = admin.get(DB, DOC)["_attachments"][SMALL]["digest"]
        etag = f'"{digest.removeprefix("md5-")}"'

        env = {"COUCHDB_URL": url}
        for name, extra in (
            ("couchtoken", []),
            ("uncached", ["--cache-size", "0", "--blob-cache-bytes", "0"]),
        ):
            service = TwistProcess(
                work / f"{name}.log", extra + ["--max-downloads", "10000", "--max-failures", "0"], env=env
            )
            service.start()
            services.append(service)
        cached, uncached = services
        tls = None
        if shutil.which("h2load") is not None:
            (work / "tls").mkdir()
            tls = TwistProcess(
                work / "tls.log",
                ["--max-downloads", "10000", "--max-failures", "0"],
                env=env,
                tls_dir=work / "tls",
            )
            tls.start()
            services.append(tls)
        user, password = admin.user or "", admin.password or ""
        auth = "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        bad_auth = "Authorization: Basic " + base64.b64encode(f"{user}:wrong".encode()).decode()
        base = {
            "direct": f"{admin.base_url}/{DB}/{DOC}/",
            "couchtoken": f"{cached.base_url}/{DB}/{DOC}/",
            "uncached": f"{uncached.base_url}/{DB}/{DOC}/",
        }

        def target(name: str, attachment: str, token: str = TOKEN) -> tuple[str, list[str]]:
            if name == "direct":
                return base[name] + attachment, [auth]
            return f"{base[name]}{attachment}?token={token}", []

        # Warm the caches (and let the feeds go live) before measuring.
        for name in TARGETS:
            url, headers = target(name, SMALL)
            for _ in range(3):
                assert status_of(url, dict(h.split(": ", 1) for h in headers)) == 200
        tls_url = f"{tls.base_url}/{DB}/{DOC}/{SMALL}?token={TOKEN}" if tls else None
        if tls_url:
            for _ in range(3):
                assert status_of(tls_url, {}) == 200
        time.sleep(6)
        for name in TARGETS:
            for attachment in (SMALL, LARGE):
                url, headers = target(name, attachment)
                status_of(url, dict(h.split(": ", 1) for h in headers))

        cases = {
            "1 KiB, 50 conn": lambda n: (*target(n, SMALL), 50),
            "8 MiB, 4 conn": lambda n: (*target(n, LARGE), 4),
            "304, 50 conn": lambda n: (
                target(n, SMALL)[0],
                target(n, SMALL)[1] + [f"If-None-Match: {etag}"],
                50,
            ),
            "403, 50 conn": lambda n: (
                (base[n] + SMALL, [bad_auth], 50) if n == "direct" else (*target(n, SMALL, "wrong"), 50)
            ),
        }
        wanted = [prefix.strip() for prefix in args.cases.split(",") if prefix.strip()]
        cases = {k: v for k, v in cases.items() if not wanted or any(k.startswith(w) for w in wanted)}
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for case, make in cases.items():
            for _ in range(args.rounds):
                for name in TARGETS:
                    url, headers, connections = make(name)
                    results.setdefault((case, name), []).append(wrk(url, connections, args.seconds, headers))

        def median(case: str, name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[(case, name)])

        print(
            f"\ncouchtoken benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
            f"wrk -t1 -d{args.seconds}s, {args.rounds} rounds (medians)\n"
        )
        header = (
            f"{'case':<16}"
            + "".join(f"{name:>12}" for name in TARGETS)
            + f"{'ct/direct':>11}{'ct/uncached':>13}"
        )
        print(header)
        print("-" * len(header))
        for case in cases:
            key = "mbps" if case.startswith("8 MiB") else "rps"
            unit = "MB/s" if key == "mbps" else "req/s"
            values = [median(case, name, key) for name in TARGETS]
            print(
                f"{case:<16}"
                + "".join(f"{v:>12.0f}" for v in values)
                + f"{values[1] / values[0]:>10.2f}x{values[1] / values[2]:>12.2f}x  {unit}"
            )
        if "1 KiB, 50 conn" in cases:
            p99 = [median("1 KiB, 50 conn", name, "p99_ms") for name in TARGETS]
            print(f"{'1 KiB p99 (ms)':<16}" + "".join(f"{v:>12.1f}" for v in p99))
        tls_cases = [] if wanted and not any("tls".startswith(w) for w in wanted) else ["tls"]
        if tls_url and tls_cases:
            # Warm 1 KiB over TLS: wrk's HTTP/1.1 beside h2load's HTTP/2, alternated.
            h1: list[dict[str, float]] = []
            h2: list[dict[str, float]] = []
            for _ in range(args.rounds):
                h1.append(wrk(tls_url, 50, args.seconds, []))
                h2.append(h2load(tls_url, 4, 50, args.seconds))
            h1_rps = statistics.median(r["rps"] for r in h1)
            h2_rps = statistics.median(r["rps"] for r in h2)
            print(f"\n{'warm 1 KiB over TLS (one service)':<40}{'req/s':>10}{'non-2xx':>10}")
            print("-" * 60)
            print(
                f"{'HTTP/1.1, wrk, 50 connections':<40}{h1_rps:>10.0f}{sum(r['non2xx'] for r in h1):>10.0f}"
            )
            print(
                f"{'HTTP/2, h2load, 4 conn x 50 streams':<40}{h2_rps:>10.0f}"
                f"{sum(r['non2xx'] for r in h2):>10.0f}"
            )
            print(
                f"HTTP/2 / HTTP/1.1: {h2_rps / h1_rps:.2f}x; p99 HTTP/1.1 "
                f"{statistics.median(r['p99_ms'] for r in h1):.1f} ms, mean HTTP/2 "
                f"{statistics.median(r['mean_ms'] for r in h2):.1f} ms"
            )
        elif tls_cases:
            print("\n(h2load is missing: apt-get install nghttp2-client for the HTTP/2 case)")
        peak = 0
        for line in Path(f"/proc/{cached.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) // 1024
        print(f"\npeak RSS of the couchtoken service: {peak} MiB")

        if not args.memory_mib:
            return
        # Memory: ten slow clients on a large attachment.
        huge = work / "huge.bin"
        with open(huge, "wb") as handle:
            for _ in range(args.memory_mib):
                handle.write(os.urandom(1024 * 1024))
        with open(huge, "rb") as handle:
            admin.put_attachment(DB, DOC, HUGE, handle)
        huge.unlink()
        before = rss_bytes(cached.process.pid)
        got: list[int] = []
        readers = [
            threading.Thread(
                target=slow_reader, args=(cached.port, f"/{DB}/{DOC}/{HUGE}?token={TOKEN}", 10, 100_000, got)
            )
            for _ in range(10)
        ]
        for reader in readers:
            reader.start()
        time.sleep(9)
        during = rss_bytes(cached.process.pid)
        for reader in readers:
            reader.join()
        print(
            f"memory: 10 clients reading a {args.memory_mib} MiB attachment at 100 KB/s for 10 s "
            f"(read {sum(got) / 1e6:.1f} MB in all): service RSS {before / 2**20:.1f} -> "
            f"{during / 2**20:.1f} MiB, growth {(during - before) / 2**20:.1f} MiB"
        )
    finally:
        for service in services:
            service.stop()
        admin.delete_db(DB)


if __name__ == "__main__":
    main()
