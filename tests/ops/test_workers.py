"""``twist couchtoken --workers N``: real supervisor and worker processes on one port."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from couchtoken.dev.pouchdb import free_port
from tests.http import read_head, refuses_connections, start_download
from tests.seeding import random_attachment_db
from tests.tlscert import write_self_signed
from tests.twistproc import TwistProcess, children, serving_pid

TOKEN = "workers-token"
BIG = 16 * 1024 * 1024
SMALL = b"served by some worker"


@pytest.fixture(scope="module")
def files(admin):
    """A database with a small and a big attachment: (db, sha256 of the big one)."""
    yield from random_attachment_db(
        admin, "ct-workers", TOKEN, "big.bin", BIG, others={"small.txt": (SMALL, "text/plain")}
    )


class Supervised:
    """``twist couchtoken --workers N --metrics-port ...``, and what its metrics port says."""

    def __init__(self, tmp_path: Path, couch_url: str, *args: str, workers: int = 2, port: str = "") -> None:
        self.metrics_port = free_port()
        self.count = workers
        self.twist = TwistProcess(
            tmp_path / "twist.log",
            [
                "--workers",
                str(workers),
                "--metrics-port",
                f"tcp:{self.metrics_port}:interface=127.0.0.1",
                *args,
            ],
            env={"COUCHDB_URL": couch_url},
        )
        if port:
            self.twist.command[self.twist.command.index("--port") + 1] = port

    @property
    def base_url(self) -> str:
        return self.twist.base_url

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.twist.process

    def url(self, db: str, attachment: str, token: str = TOKEN) -> str:
        return f"{self.base_url}/{db}/doc/{attachment}?token={token}"

    def start(self) -> None:
        self.twist.start(ready=self._all_up)
        deadline = time.monotonic() + 60
        while not self._all_up():
            assert time.monotonic() < deadline, self.twist.log()[-3000:]
            time.sleep(0.1)

    def _all_up(self) -> bool:
        try:
            up = self.workers()["up"]
        except OSError:
            return False
        return len(up) == self.count and all(up.values())

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/_metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def workers(self) -> dict[str, dict[int, float]]:
        """``couchtoken_worker_<name>{worker="i"}`` -> {name: {i: value}}."""
        figures: dict[str, dict[int, float]] = {}
        pattern = r'^couchtoken_worker_(\w+?)(?:_total)?\{worker="(\d+)"\} (\S+)$'
        for name, worker, value in re.findall(pattern, self.metrics(), re.M):
            figures.setdefault(name, {})[int(worker)] = float(value)
        return figures

    def pids(self) -> dict[int, int]:
        return {slot: int(pid) for slot, pid in self.workers()["pid"].items()}

    def summed(self, sample: str) -> float:
        """One summed sample, e.g. ``couchtoken_requests_total{status="200"}``."""
        for line in self.metrics().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        self.twist.stop()

    def log(self) -> str:
        return self.twist.log()


@pytest.fixture
def supervised(couch_server, tmp_path):
    started: list[Supervised] = []

    def start(*args: str, **kwargs) -> Supervised:
        service = Supervised(tmp_path, couch_server.url, *args, **kwargs)
        started.append(service)  # stopped afterwards even if it never got ready
        service.start()
        return service

    yield start
    for service in started:
        service.stop()


def get(url: str) -> tuple[int, bytes]:
    """A GET on a fresh connection: (status, body)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get_many(url: str, count: int, threads: int = 8) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: get(url), range(count)))


def open_download(port: int, path: str) -> tuple[socket.socket, bytes]:
    """Start a download and read its head: (socket, body bytes read so far)."""
    sock = start_download(port, path, connection="close")
    head, body = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock, body


def one_download_per_worker(service: Supervised, path: str) -> dict[int, tuple[socket.socket, bytes]]:
    """Open downloads until each worker serves one; {pid: (socket, body so far)}."""
    pids = list(service.pids().values())
    held: dict[int, tuple[socket.socket, bytes]] = {}
    for _ in range(40):
        sock, body = open_download(service.twist.port, path)
        pid = serving_pid(sock, pids)
        if pid is None or pid in held:
            sock.close()
        else:
            held[pid] = (sock, body)
        if len(held) == len(pids):
            return held
    raise AssertionError(f"40 connections did not reach every worker: {list(held)}")


def test_two_workers_both_serve_and_the_metrics_port_sums_them(supervised, files):
    db, _ = files
    service = supervised()
    pids = service.pids()
    assert len(set(pids.values())) == 2
    assert service.process.pid not in pids.values()
    assert set(pids.values()) <= set(children(service.process.pid))

    answers = get_many(service.url(db, "small.txt"), 40)

    assert answers == [(200, SMALL)] * 40
    per_worker = service.workers()["requests"]
    assert all(count > 0 for count in per_worker.values()), per_worker
    assert sum(per_worker.values()) == 40
    assert service.summed('couchtoken_requests_total{status="200"}') == 40
    assert service.summed("couchtoken_request_duration_seconds_count") == 40
    metrics = service.metrics()
    assert re.search(r'^couchtoken_cache_entries\{worker="0"\} ', metrics, re.M)
    assert re.search(r'^couchtoken_cache_entries\{worker="1"\} ', metrics, re.M)
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/_health", timeout=10) as health:
        body = json.loads(health.read())
    assert body["status"] == "ok"
    assert [(w["worker"], w["pid"], w["status"]) for w in body["workers"]] == [
        (0, pids[0], "ok"),
        (1, pids[1], "ok"),
    ]
    assert get(f"{service.base_url}/_health") == (200, b'{"status":"ok"}')
    assert get(f"{service.base_url}/_metrics")[0] in (400, 403, 404), (
        "one worker's figures are not the service's"
    )


def test_a_burst_of_keep_alive_connections_is_spread_over_the_workers(supervised):
    service = supervised()
    pids = list(service.pids().values())
    burst = [socket.create_connection(("127.0.0.1", service.twist.port), timeout=10) for _ in range(50)]
    try:
        deadline = time.monotonic() + 10
        while None in (holders := [serving_pid(sock, pids) for sock in burst]):
            assert time.monotonic() < deadline, "not every connection was accepted"
            time.sleep(0.05)
    finally:
        for sock in burst:
            sock.close()
    shares = sorted(holders.count(pid) for pid in pids)
    assert shares[0] >= 10, f"one worker took the burst: {shares}"


def test_workers_stop_when_their_supervisor_is_killed(couch_server, tmp_path):
    # A supervisor killed with SIGKILL cannot remove its sockets' directory: keep it in one of ours.
    runtime = Path(tempfile.mkdtemp(prefix="couchtoken-test-runtime-"))
    service = Supervised(tmp_path, couch_server.url)
    service.twist.env["RUNTIME_DIRECTORY"] = str(runtime)
    try:
        service.start()
        family = children(service.process.pid)
        assert len(family) == 3, "two workers and the spare"
        service.process.kill()
        service.process.wait(10)
        deadline = time.monotonic() + 10
        while alive := [pid for pid in family if os.path.exists(f"/proc/{pid}")]:
            assert time.monotonic() < deadline, f"orphaned workers still run: {alive}"
            time.sleep(0.1)
    finally:
        service.stop()
        shutil.rmtree(runtime, ignore_errors=True)
    assert "the supervisor is gone; stopping" in service.log()


def test_a_worker_killed_under_load_is_back_within_2_s_and_only_its_downloads_fail(supervised, files):
    db, _ = files
    service = supervised()
    held = one_download_per_worker(service, f"/{db}/doc/big.bin?token={TOKEN}")
    slots = {pid: slot for slot, pid in service.pids().items()}
    victim, survivor = list(held)
    stop = threading.Event()
    outcomes: list[int | str] = []

    def load() -> None:
        while not stop.is_set():
            try:
                outcomes.append(get(service.url(db, "small.txt"))[0])
            except OSError as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        served_before = service.summed('couchtoken_requests_total{status="200"}')
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        slot = slots[victim]
        while not (service.pids()[slot] not in (0, victim) and service.workers()["up"][slot] == 1):
            assert time.monotonic() - killed < 2, "the worker is not back within 2 s"
            time.sleep(0.02)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    failed = [outcome for outcome in outcomes if outcome != 200]
    assert len(failed) <= len(threads), f"more than the requests in flight on the killed worker: {failed}"
    assert outcomes[-len(threads) * 3 :] == [200] * (len(threads) * 3), "serving goes on"
    victim_socket, _ = held[victim]
    victim_socket.settimeout(10)
    with pytest.raises((ConnectionResetError, AssertionError)):
        received = sum(len(chunk) for chunk in iter(lambda: victim_socket.recv(1 << 20), b""))
        assert received == BIG
    survivor_socket, body = held[survivor]
    survivor_socket.settimeout(10)
    body += b"".join(iter(lambda: survivor_socket.recv(1 << 20), b""))
    assert len(body) == BIG, "the other worker's download is untouched"
    assert service.workers()["restarts"] == {slot: 1, 1 - slot: 0}
    assert service.summed('couchtoken_requests_total{status="200"}') >= served_before, "counts never go down"
    assert "was killed by signal 9" in service.log()


def test_sigterm_closes_the_port_drains_every_worker_and_exits_0(supervised, files):
    db, digest = files
    service = supervised("--drain-timeout", "20")
    held = one_download_per_worker(service, f"/{db}/doc/big.bin?token={TOKEN}")
    workers = list(held)

    service.process.send_signal(signal.SIGTERM)

    deadline = time.monotonic() + 5
    while not refuses_connections(service.twist.port):
        assert time.monotonic() < deadline, "the port still accepts connections"
        time.sleep(0.05)
    started = time.monotonic()
    bodies = {pid: body for pid, (_, body) in held.items()}
    open_sockets = dict(held)
    while open_sockets:
        for pid, (sock, _) in list(open_sockets.items()):
            chunk = sock.recv(65536)
            if chunk:
                bodies[pid] += chunk
            else:
                sock.close()
                del open_sockets[pid]
        time.sleep(0.002)
    assert time.monotonic() - started > 0.5, "the downloads outlived the SIGTERM"
    assert [hashlib.sha256(body).hexdigest() for body in bodies.values()] == [digest, digest]
    assert service.process.wait(30) == 0, service.log()[-3000:]
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    log = service.log()
    assert "All workers stopped" in log
    assert "Traceback" not in log


def test_a_revoked_token_stops_opening_on_every_worker_within_a_second(supervised, files, admin):
    db, _ = files
    admin.put(db, "revoked", {"download_token": "before"})
    admin.put_attachment(db, "revoked", "a.txt", b"secret", "text/plain")
    service = supervised("--feed-heartbeat", "0.2", "--max-failures", "0")
    url = f"{service.base_url}/{db}/revoked/a.txt?token="
    deadline = time.monotonic() + 20
    while True:  # every worker has the document cached and its feed live
        assert get_many(url + "before", 16) == [(200, b"secret")] * 16
        metrics = service.metrics()
        feeds = re.findall(r'^couchtoken_feeds_connected\{worker="\d"\} (\S+)', metrics, re.M)
        if feeds == ["1.0", "1.0"] and all(n >= 4 for n in service.workers()["requests"].values()):
            break
        assert time.monotonic() < deadline, metrics
    assert get_many(url + "before", 16) == [(200, b"secret")] * 16
    assert service.summed("couchtoken_cache_hits_total") > 0, "the workers answer from their caches"
    before = service.workers()["requests"]

    doc = admin.get(db, "revoked")
    admin.put(db, "revoked", {**doc, "download_token": "after"})
    time.sleep(1.0)

    assert get_many(url + "before", 24) == [(403, get(url + "before")[1])] * 24
    after = service.workers()["requests"]
    assert all(after[slot] - before[slot] > 0 for slot in before), "every worker was asked"
    assert get(url + "after") == (200, b"secret")


def test_the_guess_budget_is_divided_among_the_workers(supervised, files):
    db, _ = files
    service = supervised("--max-failures", "4")
    # One at a time: checks racing each other in one worker are throttle.py's business, not the split's.
    statuses = [status for status, _ in get_many(service.url(db, "small.txt", "wrong"), 24, threads=1)]
    per_worker = service.workers()["requests"]
    assert all(count >= 3 for count in per_worker.values()), "a guesser spread over both workers"
    assert statuses.count(403) == 4, f"2 workers x ceil(4 / 2), not 4 each: {statuses}"
    assert statuses.count(429) == 20
    assert service.log().count("guess throttling: 2 failed checks a minute per client") == 2


def test_workers_1_is_todays_single_process(couch_server, files, tmp_path):
    db, _ = files
    service = TwistProcess(
        tmp_path / "twist.log", ["--workers", "1", "--public-metrics"], env={"COUCHDB_URL": couch_server.url}
    )
    service.start()
    try:
        assert get(f"{service.base_url}/{db}/doc/small.txt?token={TOKEN}") == (200, SMALL)
        assert children(service.process.pid) == []
        assert get(f"{service.base_url}/_metrics")[0] == 200
    finally:
        service.stop()


def test_workers_on_a_unix_socket_leave_its_path_to_the_supervisor(supervised, files, tmp_path):
    db, _ = files
    path = tmp_path / "couchtoken.sock"
    service = supervised(port=f"unix:{path}")

    def get_unix() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            sock.sendall(f"GET /{db}/doc/small.txt?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while not data.endswith(SMALL):
                data += sock.recv(65536)
            return data.split(b"\r\n", 1)[0]

    deadline = time.monotonic() + 30
    while not all(count > 0 for count in service.workers()["requests"].values()):
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda _: get_unix(), range(16))) == {b"HTTP/1.1 200 OK"}
        assert time.monotonic() < deadline, "one worker took every connection"
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(30) == 0, service.log()[-3000:]
    assert not path.exists()
    assert "Traceback" not in service.log()


def test_workers_serve_tls_on_an_ssl_port(supervised, files, tmp_path):
    db, _ = files
    key, cert = write_self_signed(tmp_path)
    port = free_port()
    service = supervised(port=f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    url = f"https://127.0.0.1:{port}/{db}/doc/small.txt?token={TOKEN}"

    def get_tls(_: object) -> bytes:
        with urllib.request.urlopen(url, timeout=30, context=context) as response:
            return response.read()

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get_tls, range(24))) == {SMALL}
    assert all(count > 0 for count in service.workers()["requests"].values())


def test_ctrl_c_stops_the_supervisor_and_every_worker_quietly(couch_server, files, tmp_path):
    service = Supervised(tmp_path, couch_server.url)
    try:
        service.start()
        pids = children(service.process.pid) + [service.process.pid]
        # A terminal's Ctrl-C signals the whole foreground process group: supervisor and workers alike.
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        service.process.wait(30)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in pids):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        service.stop()
    log = service.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "All workers stopped" in log


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_worker_counts_are_one_line_errors(value, tmp_path):
    service = TwistProcess(tmp_path / "twist.log", ["--workers", value])
    result = subprocess.run(service.command, env=service.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 64
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "1 or more, or auto" in errors[0], errors
