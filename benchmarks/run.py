"""couchtoken against CouchDB itself, its own uncached path and its disk cache (run by hand, not in CI).

    .venv/bin/python benchmarks/run.py [--couchdb pouchdb|release|URL] [--seconds 5] [--rounds 2]
    .venv/bin/python benchmarks/run.py --workers 1,2   (scaling over processes: benchmarks/scaling.py)

Needs ``wrk`` and ``curl`` (Debian packages).  ``--couchdb`` picks the server
(see ``benchmarks/servers.py``): ``pouchdb`` (the default) starts a PouchDB
Server from ``tests/node_modules``; ``release`` starts a real Apache CouchDB
3.5 node with ``--couchdb-start`` (``../shared/couchdb/start-couchdb`` from
the repository root by default); a URL (``http://admin:pass@host:5984``)
uses that server, in a scratch database it deletes afterwards.

Three ``twist couchtoken`` processes serve it, and every case measures its
targets in one run, alternating them (A B C A B C) so machine drift cancels:

- direct: CouchDB serving the attachment itself (admin credentials, no
  token check): the natural limit;
- couchtoken: the service as it runs by default (token cache and blob
  cache, no disk cache): large files are relayed from CouchDB;
- uncached: ``--cache-size 0 --blob-cache-bytes 0``, a document round trip
  per download, as the classic design does;
- disk: the service with ``--disk-cache-dir`` (hot large files from disk).

Cases: 1 KiB and 8 MiB downloads, 1 MiB ``Range`` reads at random offsets
of a 64 MiB attachment, 304 and 403 answers; then the cold path (distinct
8 MiB attachments read once each, so every disk download is a fill), the
requests the disk service made of CouchDB during its hot runs, and memory
with slow clients.

Then warm 1 KiB downloads over TLS from a fourth service on an ``ssl:``
port, HTTP/1.1 (``wrk``, 50 connections) against HTTP/2 (``h2load``,
Debian's ``nghttp2-client``: 4 connections of 50 concurrent streams),
alternated the same way (``--cases tls``); skipped if ``h2load`` is missing.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import add_server_options, couchdb_server, describe  # noqa: E402
from couchtoken.dev.pouchdb import CouchAdmin  # noqa: E402
from tests.twistproc import TwistProcess, rss_bytes  # noqa: E402

DOC, TOKEN = "doc", "bench-token"
SMALL, LARGE, HUGE = "small.bin", "large.bin", "huge.bin"
MIB = 1024 * 1024
WINDOW = MIB  # the Range case reads 1 MiB windows
TARGETS = ("direct", "couchtoken", "uncached", "disk")
SMALL_TARGETS = ("direct", "couchtoken", "uncached")  # below the disk cache: the same as couchtoken
SERVICES = {
    "couchtoken": [],
    "uncached": ["--cache-size", "0", "--blob-cache-bytes", "0"],
    "disk": ["--disk-cache-dir", "{work}/disk-cache"],
}
RANGE_SCRIPT = """
math.randomseed(%(seed)d)
request = function()
  local start = math.random(0, %(size)d - %(window)d)
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  headers["Range"] = "bytes=" .. start .. "-" .. (start + %(window)d - 1)
  return wrk.format(nil, nil, headers)
end
"""


def wrk(url: str, connections: int, seconds: int, headers: list[str], script: Path | None = None) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "20s"]
    for header in headers:
        command += ["-H", header]
    if script is not None:
        command += ["-s", str(script)]
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


def status_of(url: str, headers: dict[str, str], method: str = "GET") -> int:
    request = urllib.request.Request(url, headers=headers, method=method)
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def metrics_of(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "/_metrics", timeout=30) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(couchtoken_\w+) (\S+)$", text, re.M)}


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


def read_once_each(urls: list[str], headers: list[str], workers: int) -> float:
    """Read every URL once, ``workers`` curl processes at a time; MB/s over the wall time."""
    shares = [urls[i::workers] for i in range(workers)]
    totals: list[int] = []

    def run(share: list[str]) -> None:
        command = ["curl", "-sS", "--fail", "-w", "%{size_download} %{http_code}\\n"]
        for header in headers:
            command += ["-H", header]
        for url in share:
            command += ["-o", "/dev/null", url]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            size, status = line.split()
            assert status == "200", line
            totals.append(int(size))

    threads = [threading.Thread(target=run, args=(share,)) for share in shares]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(totals) / 1e6 / (time.monotonic() - started)


def server_label(admin: CouchAdmin) -> str:
    """The server's own name and version, from its welcome (``GET /``)."""
    welcome = admin.json("GET", "/")
    name = "Apache CouchDB" if "couchdb" in welcome else "PouchDB Server"
    return f"{name} {welcome.get('version', '?')}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_options(parser)
    parser.add_argument("--seconds", type=int, default=5, help="duration of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="A B C rounds per case (medians are reported)")
    parser.add_argument(
        "--huge-mib",
        "--memory-mib",
        type=int,
        default=64,
        help="size of the large attachment for the Range and memory cases (0 skips them); "
        "PouchDB Server 4.2 fails above ~100 MiB",
    )
    parser.add_argument("--cold-files", type=int, default=16, help="8 MiB files per cold round (0 skips)")
    parser.add_argument("--slow-clients", type=int, default=20, help="clients in the memory case")
    parser.add_argument(
        "--cases", default="", help="comma-separated case prefixes to run, e.g. 1,tls,cold (default: all)"
    )
    parser.add_argument(
        "--workers", default="", help="e.g. 1,2: only warm 1 KiB per --workers count, and a worker killed"
    )
    args = parser.parse_args()
    for tool in ("wrk", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install {tool}")
    if args.workers:
        from benchmarks import scaling

        return scaling.main(args)

    work = Path(tempfile.mkdtemp(prefix="couchtoken-bench-"))
    try:
        with couchdb_server(args.couchdb, work, args.couchdb_start) as server_url:
            print(f"server: {describe(args.couchdb)}")
            measure(args, server_url, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, server_url: str, work: Path) -> None:
    db = f"bench-{os.getpid()}"
    admin = CouchAdmin(server_url)
    services: dict[str, TwistProcess] = {}
    try:
        admin.create_db(db)
        admin.put(db, DOC, {"download_token": TOKEN})
        admin.put_attachment(db, DOC, SMALL, os.urandom(1024))
        admin.put_attachment(db, DOC, LARGE, os.urandom(8 * MIB))
        if args.huge_mib:
            huge = work / "huge.bin"
            with open(huge, "wb") as handle:
                for _ in range(args.huge_mib):
                    handle.write(os.urandom(MIB))
            with open(huge, "rb") as handle:
                admin.put_attachment(db, DOC, HUGE, handle)
            huge.unlink()
        digest = admin.get(db, DOC)["_attachments"][SMALL]["digest"]
        etag = f'"{digest.removeprefix("md5-")}"'

        for name, extra in SERVICES.items():
            service = TwistProcess(
                work / f"{name}.log",
                [arg.format(work=work) for arg in extra]
                + ["--max-downloads", "10000", "--max-failures", "0", "--public-metrics"],
                env={"COUCHDB_URL": server_url},
            )
            service.start()
            services[name] = service
        tls = None
        if shutil.which("h2load") is not None:
            (work / "tls").mkdir()
            tls = TwistProcess(
                work / "tls.log",
                ["--max-downloads", "10000", "--max-failures", "0"],
                env={"COUCHDB_URL": server_url},
                tls_dir=work / "tls",
            )
            tls.start()
            services["tls"] = tls
        user, password = admin.user, admin.password
        auth = "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        # Not the admin: CouchDB 3.4+ locks a user out after failed logins (chttpd_auth_lockout).
        bad_auth = "Authorization: Basic " + base64.b64encode(b"bench-nobody:wrong").decode()
        base = {
            "direct": f"{admin.base_url}/{db}/{DOC}/",
            **{name: f"{services[name].base_url}/{db}/{DOC}/" for name in SERVICES},
        }

        def target(name: str, attachment: str, token: str = TOKEN) -> tuple[str, list[str]]:
            if name == "direct":
                return base[name] + attachment, [auth]
            return f"{base[name]}{attachment}?token={token}", []

        def get(name: str, attachment: str, method: str = "GET") -> int:
            url, headers = target(name, attachment)
            return status_of(url, dict(h.split(": ", 1) for h in headers), method)

        # Warm the caches (and let the feeds go live) before measuring; fill the disk cache.
        for name in TARGETS:
            for _ in range(3):
                assert get(name, SMALL) == 200
        tls_url = f"{tls.base_url}/{db}/{DOC}/{SMALL}?token={TOKEN}" if tls else None
        if tls_url:
            for _ in range(3):
                assert status_of(tls_url, {}) == 200
        time.sleep(6)
        for name in TARGETS:
            for attachment in (SMALL, LARGE) + ((HUGE,) if args.huge_mib else ()):
                assert get(name, attachment) == 200, (name, attachment)
        for attachment in (LARGE,) + ((HUGE,) if args.huge_mib else ()):
            assert get("disk", attachment) == 200
        script = work / "ranges.lua"
        script.write_text(RANGE_SCRIPT % {"seed": 1, "size": args.huge_mib * MIB, "window": WINDOW})

        cases: dict[str, tuple[str, tuple[str, ...], Callable]] = {
            "1 KiB, 50 conn": (
                "rps",
                SMALL_TARGETS,
                lambda n: (*target(n, SMALL), 50),
            ),
            "8 MiB, 4 conn": ("mbps", TARGETS, lambda n: (*target(n, LARGE), 4)),
            f"{args.huge_mib} MiB Range, 20 conn": (
                "rps",
                ("direct", "couchtoken", "disk"),
                lambda n: (*target(n, HUGE), 20, script),
            ),
            "304, 50 conn": (
                "rps",
                SMALL_TARGETS,
                lambda n: (target(n, SMALL)[0], target(n, SMALL)[1] + [f"If-None-Match: {etag}"], 50),
            ),
            "403, 50 conn": (
                "rps",
                SMALL_TARGETS,
                lambda n: (
                    (base[n] + SMALL, [bad_auth], 50) if n == "direct" else (*target(n, SMALL, "wrong"), 50)
                ),
            ),
        }
        if not args.huge_mib:
            cases = {k: v for k, v in cases.items() if "Range" not in k}
        wanted = [prefix.strip() for prefix in args.cases.split(",") if prefix.strip()]
        cases = {k: v for k, v in cases.items() if not wanted or any(k.startswith(w) for w in wanted)}
        before_hot = metrics_of(services["disk"].base_url)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for case, (_, names, make) in cases.items():
            for _ in range(args.rounds):
                for name in names:
                    url, headers, connections, *rest = make(name)
                    results.setdefault((case, name), []).append(
                        wrk(url, connections, args.seconds, headers, *rest)
                    )
        after_hot = metrics_of(services["disk"].base_url)

        def median(case: str, name: str, key: str) -> float:
            return statistics.median(r[key] for r in results[(case, name)])

        print(
            f"\ncouchtoken benchmark, {time.strftime('%Y-%m-%d')}, {server_label(admin)}, "
            f"{os.cpu_count()} cores, wrk -t1 -d{args.seconds}s, {args.rounds} rounds (medians)\n"
        )
        header = (
            f"{'case':<24}"
            + "".join(f"{name:>11}" for name in TARGETS)
            + f"{'ct/direct':>11}{'disk/direct':>13}"
        )
        if cases:  # not with --cases tls alone
            print(header)
            print("-" * len(header))

        def row(label: str, values: dict[str, float], unit: str, digits: int = 0) -> None:
            cells = "".join(f"{values[n]:>11.{digits}f}" if n in values else f"{'-':>11}" for n in TARGETS)

            def ratio(name: str) -> str:
                return (
                    f"{values[name] / values['direct']:.2f}x"
                    if name in values and values.get("direct")
                    else "-"
                )

            print(f"{label:<24}{cells}{ratio('couchtoken'):>11}{ratio('disk'):>13}  {unit}")

        for case, (key, names, _) in cases.items():
            row(case, {n: median(case, n, key) for n in names}, "MB/s" if key == "mbps" else "req/s")
            if case.startswith(("1 KiB", "8 MiB")):
                row("  p99 (ms)", {n: median(case, n, "p99_ms") for n in names}, "ms", 1)
        failures = {
            f"{case}/{name}": sum(r["non2xx"] for r in runs) for (case, name), runs in results.items()
        }
        bad = {k: v for k, v in failures.items() if v and not k.startswith("403")}
        if bad:
            print(f"\nnon-2xx answers: {bad}")

        if args.huge_mib and "disk" in {n for _, names, _ in cases.values() for n in names}:
            requests = {
                "documents": "couchtoken_cache_misses_total",
                "attachments": "couchtoken_disk_cache_misses_total",
            }
            counts = ", ".join(
                f"{what} {after_hot.get(m, 0) - before_hot.get(m, 0):.0f}" for what, m in requests.items()
            )
            hits = after_hot.get("couchtoken_disk_cache_hits_total", 0) - before_hot.get(
                "couchtoken_disk_cache_hits_total", 0
            )
            print(f"\nrequests the disk service made of CouchDB in its {hits:.0f} hot downloads: {counts}")

        tls_wanted = not wanted or any("tls".startswith(w) for w in wanted)
        if tls_url and tls_wanted:
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
        elif tls_wanted:
            print("\n(h2load is missing: apt-get install nghttp2-client for the HTTP/2 case)")

        if args.cold_files and (not wanted or "cold" in wanted):
            cold_results: dict[str, list[float]] = {}
            cold_targets = ("direct", "couchtoken", "disk")
            for round_number in range(args.rounds):
                names = [f"cold-{round_number}-{i}.bin" for i in range(args.cold_files)]
                for name in names:
                    admin.put_attachment(db, DOC, name, os.urandom(8 * MIB))
                time.sleep(1)  # let the feeds drop the document
                for target_name in cold_targets[1:]:
                    for name in names:  # the token check is cached; no body is read
                        assert get(target_name, name, "HEAD") == 200
                order = cold_targets if round_number % 2 == 0 else tuple(reversed(cold_targets))
                for target_name in order:
                    urls = [target(target_name, name)[0] for name in names]
                    cold_results.setdefault(target_name, []).append(
                        read_once_each(urls, target(target_name, names[0])[1], 4)
                    )
            values = {n: statistics.median(v) for n, v in cold_results.items()}
            print()
            row("8 MiB cold, 4 conn", values, "MB/s (each file read once: every disk read is a fill)")
            fills = metrics_of(services["disk"].base_url)
            print(
                f"disk service: fills {fills.get('couchtoken_disk_cache_fills_total', 0):.0f}, "
                f"fill failures {fills.get('couchtoken_disk_cache_fill_failures_total', 0):.0f}"
            )

        for name in ("couchtoken", "disk"):
            peak = 0
            for line in Path(f"/proc/{services[name].process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) // 1024
            print(f"peak RSS of the {name} service: {peak} MiB")

        if not args.huge_mib or wanted:
            return
        for name in ("couchtoken", "disk"):
            service = services[name]
            before = rss_bytes(service.process.pid)
            got: list[int] = []
            readers = [
                threading.Thread(
                    target=slow_reader,
                    args=(service.port, f"/{db}/{DOC}/{HUGE}?token={TOKEN}", 10, 100_000, got),
                )
                for _ in range(args.slow_clients)
            ]
            for reader in readers:
                reader.start()
            time.sleep(9)
            during = rss_bytes(service.process.pid)
            for reader in readers:
                reader.join()
            print(
                f"memory, {name}: {args.slow_clients} clients reading a {args.huge_mib} MiB attachment at "
                f"100 KB/s for 10 s (read {sum(got) / 1e6:.1f} MB in all): RSS {before / 2**20:.1f} -> "
                f"{during / 2**20:.1f} MiB, growth {(during - before) / 2**20:.1f} MiB"
            )
    finally:
        for service in services.values():
            service.stop()
        try:
            admin.delete_db(db)
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass


if __name__ == "__main__":
    main()
