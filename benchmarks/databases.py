"""Per-user databases at scale: many databases, random downloads (run by hand, not in CI).

    .venv/bin/python benchmarks/databases.py --couchdb release [--databases 10000] [--seconds 20]

Needs ``wrk`` (Debian package ``wrk``) and ``ss`` (``iproute2``), and a real
CouchDB (``--couchdb release`` starts a 3.5 node; a URL names one that runs):
the global feed needs ``/_db_updates``, so ``_global_changes`` is created if
missing.  The databases ``userdb-bench-<n>`` (``q=1``), one document with
a 512-byte attachment each, are created once and kept for the next run
(``--drop`` deletes them at the end).

Measures, with the blob cache off (every download reads its attachment from
CouchDB) unless said otherwise:

- requests/s of 50 clients fetching random databases (wrk, a Lua script),
  on ``couchtoken`` (defaults) after warm-up and on ``--cache-size 0``,
  alternating the two, and on a third service with the blob cache on (the
  default: the small attachments then come from memory too);
- requests reaching CouchDB per download (CouchDB's own
  ``httpd/requests`` counter);
- connections from each service to CouchDB, counted with ``ss`` every
  50 ms during the load: the most seen;
- revocation latency: a new token is written, the old link polled until it
  answers 403; for databases without a feed of their own (on a third service
  with ``--max-feeds 0``, so polling cannot make the database hot) and for a
  hot database with its own feed;
- the service's memory (RSS) with every database cached.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import add_server_options, couchdb_server, describe  # noqa: E402
from couchtoken.dev.pouchdb import CouchAdmin  # noqa: E402
from tests.twistproc import TwistProcess, rss_bytes  # noqa: E402

PREFIX = "userdb-bench-"
BODY = b"x" * 512


def name(i: int) -> str:
    return f"{PREFIX}{i:06d}"


def token(i: int, generation: int = 0) -> str:
    return f"tok-{i}" if generation == 0 else f"tok-{i}-{generation}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def create_databases(admin: CouchAdmin, count: int, workers: int = 8) -> float:
    """Create the missing ``userdb-bench-*`` databases; returns the seconds it took."""
    status, _, raw = admin.request("GET", "/_all_dbs?" + "startkey=" + quote(json.dumps(PREFIX)))
    existing = {n for n in json.loads(raw) if n.startswith(PREFIX)} if status == 200 else set()
    missing = [i for i in range(count) if name(i) not in existing]
    attachment = {"content_type": "application/octet-stream", "data": base64.b64encode(BODY).decode()}

    def one(i: int) -> None:
        admin.request("PUT", f"/{name(i)}?q=1")
        status, _, raw = admin.request(
            "PUT", f"/{name(i)}/doc", {"download_token": token(i), "_attachments": {"f.bin": attachment}}
        )
        if status not in (201, 409):
            raise RuntimeError(f"{name(i)}: {status} {raw[:200]!r}")

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, missing))
    return time.monotonic() - started if missing else 0.0


def couchdb_requests(admin: CouchAdmin) -> int:
    return int(admin.json("GET", "/_node/_local/_stats/couchdb/httpd/requests")["value"])


def lua_script(path: Path, count: int, sequential: bool) -> Path:
    pick = (
        "counter = counter % COUNT; local i = counter; counter = counter + 1"
        if sequential
        else ("local i = math.random(0, COUNT - 1)")
    )
    path.write_text(
        f"""COUNT = {count}
counter = 0
math.randomseed(os.time())
init = function(args)
  counter = tonumber(args[1] or "0")
end
request = function()
  {pick}
  return wrk.format("GET", string.format("/{PREFIX}%06d/doc/f.bin?token=tok-%d", i, i))
end
"""
    )
    return path


def wrk(
    base_url: str, script: Path, seconds: float, connections: int = 50, start: int = 0
) -> dict[str, float]:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    command.append("-s")
    command += [str(script), base_url, "--", str(start)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": total,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "p99_ms": float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)],
    }


class ConnectionCounter:
    """Counts, every 50 ms, the established TCP connections from ``pid`` to ``port`` (``ss``)."""

    def __init__(self, pid: int, port: int) -> None:
        self._pid, self._port = pid, port
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", "dport", "=", f":{self._port}"],
            capture_output=True,
            text=True,
        ).stdout
        return sum(1 for line in out.splitlines() if f"pid={self._pid}," in line)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, self.count())
            time.sleep(0.05)

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (and its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listening_pid(port: int) -> int | None:
    """The process listening on ``port`` (CouchDB), if ``ss`` may show it."""
    out = subprocess.run(["ss", "-Htlnp", "sport", "=", f":{port}"], capture_output=True, text=True).stdout
    found = re.search(r"pid=(\d+),", out)
    return int(found.group(1)) if found else None


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def metric(base_url: str, metric_name: str) -> float:
    with urllib.request.urlopen(f"{base_url}/_metrics", timeout=30) as response:
        text = response.read().decode()
    line = next(line for line in text.splitlines() if line.startswith(metric_name + " "))
    return float(line.split()[1])


def revocation_latencies(
    admin: CouchAdmin, base_url: str, picks: list[int], samples_per_db: int
) -> list[float]:
    """For each database: warm it, write a new token, poll the old link until 403 (ms)."""
    latencies = []
    for i in picks:
        for generation in range(1, samples_per_db + 1):
            old = token(i, generation - 1)
            url = f"{base_url}/{name(i)}/doc/f.bin?token="
            deadline = time.monotonic() + 10
            hits = metric(base_url, "couchtoken_cache_hits_total")
            while time.monotonic() < deadline:  # cached once a download no longer misses
                assert status_of(url + old) == 200
                now = metric(base_url, "couchtoken_cache_hits_total")
                if now > hits:
                    break
                hits = now
                time.sleep(0.1)
            current = admin.get(name(i), "doc")
            current["download_token"] = token(i, generation)
            admin.json("PUT", f"/{name(i)}/doc", current)
            acked = time.perf_counter()
            while status_of(url + old) != 403:
                time.sleep(0.01)
            latencies.append((time.perf_counter() - acked) * 1000)
        current = admin.get(name(i), "doc")  # back to the token the load uses
        current["download_token"] = token(i)
        admin.json("PUT", f"/{name(i)}/doc", current)
    return latencies


def start_service(work: Path, label: str, admin_url: str, extra: list[str]) -> TwistProcess:
    service = TwistProcess(
        work / f"{label}.log",
        ["--max-failures", "0", "--blob-cache-bytes", "0", "--public-metrics", *extra],
        env={"COUCHDB_URL": admin_url},
    )
    service.start()
    return service


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--databases", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20, help="duration of each measured wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="measured runs per service, alternating")
    parser.add_argument("--samples", type=int, default=100, help="revocation samples of each kind")
    parser.add_argument("--drop", action="store_true", help="delete the databases at the end")
    add_server_options(parser)
    args = parser.parse_args()
    if args.couchdb == "pouchdb":
        sys.exit("needs a real CouchDB (--couchdb release or a URL): PouchDB Server has no /_db_updates")
    for tool in ("wrk", "ss"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing")
    work = Path(tempfile.mkdtemp(prefix="couchtoken-databases-"))
    with couchdb_server(args.couchdb, work, args.couchdb_start) as admin_url:
        admin = CouchAdmin(admin_url)
        if admin.request("GET", "/_global_changes")[0] == 404:
            admin.create_db("_global_changes")
        print(f"server: {describe(args.couchdb)}; {args.databases} databases; blob cache off but where said")
        took = create_databases(admin, args.databases)
        if took:
            print(
                f"created the missing databases in {took:.0f} s ({took / args.databases * 1000:.1f} ms each)"
            )
        try:
            run(args, admin, admin_url, work)
        finally:
            if args.drop:
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda i: admin.delete_db(name(i)), range(args.databases)))


def run(args: argparse.Namespace, admin: CouchAdmin, admin_url: str, work: Path) -> None:
    count = args.databases
    random_script = lua_script(work / "random.lua", count, sequential=False)
    in_order = lua_script(work / "in-order.lua", count, sequential=True)
    size = ["--cache-size", str(count + count // 5)]
    cached = start_service(work, "cached", admin_url, size)
    uncached = start_service(work, "uncached", admin_url, ["--cache-size", "0"])
    feedless = start_service(work, "feedless", admin_url, ["--max-feeds", "0"])
    # The defaults as users run them: small bodies are kept in memory too (64 MiB).
    blobs = start_service(work, "blobs", admin_url, [*size, "--blob-cache-bytes", str(64 * 2**20)])
    services = {"couchtoken": cached, "--cache-size 0": uncached, "blob cache on": blobs}
    try:
        rss_before = rss_bytes(cached.process.pid)
        for label, service in (("couchtoken", cached), ("blob cache on", blobs)):
            warm_started = time.monotonic()
            start = 0
            for _ in range(40):  # in order, round and round: every database three times at least
                start += int(wrk(service.base_url, in_order, 10, connections=50, start=start)["requests"])
                if (
                    start >= 3 * count
                    and metric(service.base_url, "couchtoken_cache_entries") >= 0.99 * count
                ):
                    break
            entries = metric(service.base_url, "couchtoken_cache_entries")
            print(
                f"warm-up of {label}: {time.monotonic() - warm_started:.0f} s, {entries:.0f} documents cached"
            )
        wrk(uncached.base_url, random_script, 5)
        results: dict[str, list[dict[str, float]]] = {label: [] for label in services}
        port = int(admin_url.rsplit(":", 1)[1].split("/")[0])
        couchdb_pid = listening_pid(port)
        for _ in range(args.rounds):
            for label, service in services.items():
                before = couchdb_requests(admin)
                cpu_service = cpu_seconds(service.process.pid)
                cpu_couchdb = cpu_seconds(couchdb_pid) if couchdb_pid else 0.0
                with ConnectionCounter(service.process.pid, port) as connections:
                    outcome = wrk(service.base_url, random_script, args.seconds)
                outcome["per_download"] = (couchdb_requests(admin) - before - 1) / outcome["requests"]
                outcome["connections"] = connections.most
                outcome["service_ms"] = (
                    (cpu_seconds(service.process.pid) - cpu_service) * 1000 / outcome["requests"]
                )
                if couchdb_pid:
                    outcome["couchdb_ms"] = (
                        (cpu_seconds(couchdb_pid) - cpu_couchdb) * 1000 / outcome["requests"]
                    )
                results[label].append(outcome)
        load = f"wrk -t1 -c50 -d{args.seconds:g}s"
        print(f"\n50 clients, random databases, {load}, {args.rounds} rounds (medians)")
        print(
            f"{'':16}{'req/s':>9}{'CouchDB req/download':>22}{'p99 ms':>9}{'non-2xx':>9}{'most conns':>12}"
            f"{'CPU ms/download: service':>26}{'CouchDB':>9}"
        )
        medians = {}
        for label, outcomes in results.items():
            rps = sorted(o["rps"] for o in outcomes)[len(outcomes) // 2]
            medians[label] = rps
            per = sorted(o["per_download"] for o in outcomes)[len(outcomes) // 2]
            p99 = sorted(o["p99_ms"] for o in outcomes)[len(outcomes) // 2]
            non2xx = sum(o["non2xx"] for o in outcomes)
            most = max(o["connections"] for o in outcomes)
            cpu = sorted(o["service_ms"] for o in outcomes)[len(outcomes) // 2]
            couch = sorted(o.get("couchdb_ms", 0.0) for o in outcomes)[len(outcomes) // 2]
            print(f"{label:16}{rps:9.0f}{per:22.3f}{p99:9.1f}{non2xx:9d}{most:12d}{cpu:26.2f}{couch:9.2f}")
        print(f"couchtoken / --cache-size 0: {medians['couchtoken'] / medians['--cache-size 0']:.2f}x")
        print(f"blob cache on / --cache-size 0: {medians['blob cache on'] / medians['--cache-size 0']:.2f}x")
        rss_after = rss_bytes(cached.process.pid)
        print(
            f"memory of the couchtoken service: {rss_before / 2**20:.0f} MiB at start, "
            f"{rss_after / 2**20:.0f} MiB with {metric(cached.base_url, 'couchtoken_cache_entries'):.0f} "
            f"documents cached ({metric(cached.base_url, 'couchtoken_cache_bytes') / 2**20:.1f} MiB by the "
            "cache's own estimate)"
        )
        picks = [(i * 7919) % count for i in range(1, 1 + max(1, args.samples // 4))]
        feedless_ms = revocation_latencies(admin, feedless.base_url, picks, 4)
        print(
            f"\nrevocation latency, databases without a feed of their own (--max-feeds 0), "
            f"{len(feedless_ms)} samples (ms): p50 {percentile(feedless_ms, 0.5):.0f}  "
            f"p99 {percentile(feedless_ms, 0.99):.0f}  max {max(feedless_ms):.0f}"
        )
        hot = count // 2
        feeds_before = metric(cached.base_url, "couchtoken_feeds_connected")
        for _ in range(30):  # more than one passed check a second: the database gets its own feed
            status_of(f"{cached.base_url}/{name(hot)}/doc/f.bin?token={token(hot)}")
        time.sleep(2)
        feeds_after = metric(cached.base_url, "couchtoken_feeds_connected")
        print(f"feeds connected before the hot database: {feeds_before:.0f}, after: {feeds_after:.0f}")
        own_ms = revocation_latencies(admin, cached.base_url, [hot], args.samples)
        print(
            f"revocation latency, a hot database with its own feed, {len(own_ms)} samples (ms): "
            f"p50 {percentile(own_ms, 0.5):.0f}  p99 {percentile(own_ms, 0.99):.0f}  max {max(own_ms):.0f}"
        )
    finally:
        for service in (cached, uncached, feedless, blobs):
            service.stop()


if __name__ == "__main__":
    main()
