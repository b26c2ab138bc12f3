"""couchtoken against CouchDB itself and against its own uncached path (run by hand, not in CI).

    .venv/bin/python benchmarks/run.py [--seconds 5] [--rounds 2] [--memory-mib 256]
    .venv/bin/python benchmarks/run.py --workers 1,2   (scaling over processes: benchmarks/scaling.py)

Needs ``wrk`` (Debian package ``wrk``).  Starts a PouchDB Server and two
``twist couchtoken`` processes, seeds a 1 KiB and an 8 MiB attachment, and
measures three targets in one run, alternating them (A B C A B C) so machine
drift cancels out:

- direct: CouchDB serving the attachment itself (admin credentials, no
  token check): the natural limit;
- couchtoken: the service with its caches warm;
- uncached: the same service with ``--cache-size 0 --blob-cache-bytes 0``,
  a document round trip per download, as the classic design does.

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

from couchtoken.dev.pouchdb import CouchAdmin, PouchDBServer  # noqa: E402
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


def status_of(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
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
    parser.add_argument("--cases", default="", help="comma-separated case prefixes to run (default: all)")
    parser.add_argument(
        "--workers", default="", help="e.g. 1,2: only warm 1 KiB per --workers count, and a worker killed"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")
    if args.workers:
        from benchmarks import scaling

        return scaling.main(args)

    work = Path(tempfile.mkdtemp(prefix="couchtoken-bench-"))
    pouchdb = PouchDBServer(work / "pouchdb")
    pouchdb.start()
    services: list[TwistProcess] = []
    try:
        admin = CouchAdmin(pouchdb.url)
        admin.create_db(DB)
        admin.put(DB, DOC, {"download_token": TOKEN})
        admin.put_attachment(DB, DOC, SMALL, os.urandom(1024))
        admin.put_attachment(DB, DOC, LARGE, os.urandom(8 * 1024 * 1024))
        digest = admin.get(DB, DOC)["_attachments"][SMALL]["digest"]
        etag = f'"{digest.removeprefix("md5-")}"'

        env = {"COUCHDB_URL": pouchdb.url}
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
        user, password = pouchdb.admin
        auth = "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        bad_auth = "Authorization: Basic " + base64.b64encode(f"{user}:wrong".encode()).decode()
        base = {
            "direct": f"http://127.0.0.1:{pouchdb.port}/{DB}/{DOC}/",
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
        pouchdb.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
