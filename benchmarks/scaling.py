"""``benchmarks/run.py --workers 1,2``: warm 1 KiB downloads per worker count, and a worker killed under load.

For each count a ``twist couchtoken --workers N`` serves the same 1 KiB
attachment, caches warm on every worker; wrk measures them in alternating
rounds (1 2 1 2) so machine drift cancels out, and the ratio to the first
count is printed.  Then, with the largest count, wrk runs while one worker
is killed with SIGKILL: the killed worker's connections fail (wrk's read
errors), nothing else may, and the time until the supervisor's metrics port
sees the new worker answer is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
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

from benchmarks.servers import couchdb_server, describe  # noqa: E402
from couchtoken.dev.pouchdb import CouchAdmin, free_port  # noqa: E402
from tests.twistproc import TwistProcess, children  # noqa: E402

DB, DOC, TOKEN, SMALL = "bench-workers", "doc", "bench-token", "small.bin"
CONNECTIONS = 50


def wrk(url: str, seconds: float) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:.0f}s", "--timeout", "10s", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "read_errors": int(errors.group(2)) if errors else 0,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes used so far."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measured(service: TwistProcess, url: str, seconds: float) -> dict[str, float]:
    """One wrk run, with the cores the service, wrk and everything else on the machine used meanwhile."""
    pids = [service.process.pid, *children(service.process.pid)]
    service_before, busy_before = cpu_seconds(pids), machine_busy_seconds()
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = wrk(url, seconds)
    elapsed = time.monotonic() - started
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    service_cores = (cpu_seconds(pids) - service_before) / elapsed
    wrk_cores = (
        wrk_after.ru_utime + wrk_after.ru_stime - wrk_before.ru_utime - wrk_before.ru_stime
    ) / elapsed
    busy = (machine_busy_seconds() - busy_before) / elapsed
    return {
        **result,
        "service_cores": service_cores,
        "wrk_cores": wrk_cores,
        "other_cores": max(0.0, busy - service_cores - wrk_cores),
    }


def worker_figures(metrics_port: int) -> dict[str, dict[str, float]]:
    """``couchtoken_worker_*`` from the supervisor's metrics port: name -> {worker: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/_metrics", timeout=10) as response:
        text = response.read().decode()
    figures: dict[str, dict[str, float]] = {}
    for name, worker, value in re.findall(
        r'^couchtoken_worker_(\w+?)(?:_total)?\{worker="(\d+)"\} (\S+)$', text, re.M
    ):
        figures.setdefault(name, {})[worker] = float(value)
    return figures


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` whose server side ``pid`` holds, from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            held += os.readlink(fd) in inodes
        except OSError:
            pass
    return held


def kill_under_load(count: int, metrics_port: int, port: int, url: str, seconds: float) -> None:
    """SIGKILL worker 0 a third into a wrk run; how long until it answers again, and what failed."""
    pid = int(worker_figures(metrics_port)["pid"]["0"])
    result: dict[str, float] = {}
    load = threading.Thread(target=lambda: result.update(wrk(url, seconds)))
    load.start()
    time.sleep(seconds / 3)
    held = connections_held(pid, port)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    back = None
    while back is None and time.monotonic() - killed < 30:
        figures = worker_figures(metrics_port)
        if figures["pid"]["0"] not in (0, pid) and figures["up"]["0"] == 1:
            back = time.monotonic() - killed
        time.sleep(0.02)
    load.join()
    print(
        f"\nSIGKILL of one of {count} workers "
        f"under load (wrk -c{CONNECTIONS}, {seconds:.0f} s): {result['requests']:.0f} requests, "
        f"non-2xx {result['non2xx']:.0f}, socket errors {result['socket_errors']:.0f} "
        f"(read {result['read_errors']:.0f}; the killed worker held {held} of {CONNECTIONS} connections); "
        + (f"back and answering in {back:.2f} s" if back is not None else "NOT back within 30 s")
    )


def main(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="couchtoken-bench-workers-"))
    services: dict[int, tuple[TwistProcess, int]] = {}
    choice = getattr(args, "couchdb", "pouchdb")
    try:
        with couchdb_server(choice, work) as url:
            admin = CouchAdmin(url)
            admin.create_db(DB)
            admin.put(DB, DOC, {"download_token": TOKEN})
            admin.put_attachment(DB, DOC, SMALL, os.urandom(1024))
            for count in counts:
                metrics_port = free_port()
                service = TwistProcess(
                    work / f"workers-{count}.log",
                    ["--workers", str(count), "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1"]
                    + ["--max-downloads", "10000", "--max-failures", "0"],
                    env={"COUCHDB_URL": url},
                )
                service.start()
                services[count] = (service, metrics_port)
            target = {
                count: f"{service.base_url}/{DB}/{DOC}/{SMALL}?token={TOKEN}"
                for count, (service, _) in services.items()
            }
            # Warm every worker's caches: a burst reaches them all, the feeds go live, then another burst.
            for count in counts:
                wrk(target[count], 1)
            time.sleep(4)
            for count in counts:
                wrk(target[count], 1)
            results: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
            for _ in range(args.rounds):
                for count in counts:
                    results[count].append(measured(services[count][0], target[count], args.seconds))
            print(
                f"\ncouchtoken --workers, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores "
                f"(shared with wrk and {describe(choice)}), warm 1 KiB, wrk -t1 -c{CONNECTIONS} "
                f"-d{args.seconds}s, {args.rounds} rounds (medians)\n"
            )
            print(
                f"{'':<13}{'req/s':>8}{'ratio':>8}{'failed':>8}   cores used by: service  wrk  others"
                "   req per service CPU-s   requests per worker"
            )
            base = statistics.median(r["rps"] for r in results[counts[0]])
            for count in counts:

                def median(key: str, count: int = count) -> float:
                    return statistics.median(r[key] for r in results[count])

                rps = median("rps")
                failed = sum(r["non2xx"] + r["socket_errors"] for r in results[count])
                shares = worker_figures(services[count][1]).get("requests", {})
                total = sum(shares.values()) or 1
                spread = " ".join(f"{100 * v / total:.0f}%" for _, v in sorted(shares.items()))
                print(
                    f"--workers {count:<3}{rps:>8.0f}{rps / base:>7.2f}x{failed:>8}"
                    f"{median('service_cores'):>23.2f}{median('wrk_cores'):>5.2f}{median('other_cores'):>8.2f}"
                    f"{rps / max(median('service_cores'), 0.01):>24.0f}   {spread}"
                )
            largest = max(counts)
            if largest > 1:
                service, metrics_port = services[largest]
                kill_under_load(largest, metrics_port, service.port, target[largest], max(6.0, args.seconds))
    finally:
        for service, _ in services.values():
            service.stop()
        shutil.rmtree(work, ignore_errors=True)
