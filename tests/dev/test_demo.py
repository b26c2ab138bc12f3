"""``make run``'s demo: Ctrl-C and SIGTERM drain downloads, stop PouchDB Server, leave nothing behind."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from couchtoken.dev.pouchdb import ROOT, CouchAdmin, free_port
from tests.http import read_head, start_download

SIZE = 16 * 1024 * 1024
TOKEN = "demo-drain-token"
LINK = re.compile(r"curl -i '(http://127\.0\.0\.1:\d+(/demo/hello/hello\.txt\?token=[^']+))'")
POUCHDB = re.compile(r"PouchDB Server on http://127\.0\.0\.1:(\d+) \((\S+) / (\S+)\)")


def _stat(pid: int) -> tuple[int, int] | None:
    """A process's parent PID and start time (which tells a reused PID apart), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return False
    return True


class Demo:
    """``python -m couchtoken.dev.demo`` in a process group of its own, as ``make run`` starts it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.pouchdb_port = free_port()
        self.log_path = tmp_path / "demo.log"
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "COUCHTOKEN_DEMO_POUCHDB_PORT": str(self.pouchdb_port),
            "COUCHTOKEN_DEMO_POUCHDB_DIR": str(tmp_path / "pouchdb"),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("COUCHDB_URL", "COUCHDB_URL_FILE", "DOWNLOAD_TOKEN_KEY_NAME"):
            self.env.pop(name, None)
        self.process: subprocess.Popen[bytes] | None = None
        self.children: dict[int, tuple[int, str]] = {}  # pid -> (start time, command line)

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "couchtoken.dev.demo"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # like the foreground job a terminal's Ctrl-C goes to
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (LINK.search(self.log()) and _listening(self.port)):
            if self.process.poll() is not None:
                raise RuntimeError(f"the demo exited: {self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the demo did not start: {self.log()[-3000:]}")
            time.sleep(0.1)
        self.children = self._descendants()

    def _descendants(self) -> dict[int, tuple[int, str]]:
        assert self.process is not None
        parents: dict[int, int] = {}
        started: dict[int, int] = {}
        for pid in _pids():
            stat = _stat(pid)
            if stat is not None:
                parents[pid], started[pid] = stat
        found: dict[int, tuple[int, str]] = {}
        family = {self.process.pid}
        grew = True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in family and pid not in family:
                    family.add(pid)
                    found[pid] = (started[pid], _cmdline(pid))
                    grew = True
        return found

    def admin(self) -> CouchAdmin:
        match = POUCHDB.search(self.log())
        assert match, self.log()
        port, user, password = match.groups()
        return CouchAdmin(f"http://{user}:{password}@127.0.0.1:{port}")

    def alive_children(self) -> list[str]:
        return [line for pid, (start, line) in self.children.items() if (_stat(pid) or (0, -1))[1] == start]

    def leftovers(self) -> list[str]:
        """Processes that name this run's data directory or ports."""
        marks = (str(self.tmp_path), f"tcp:{self.port}", f"--port {self.pouchdb_port}")
        lines = [_cmdline(pid) for pid in _pids()]
        return [line for line in lines if any(mark in line for mark in marks)]

    def kill(self) -> None:
        """After a failure: leave nothing running."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid, (start, _) in self.children.items():
            if (_stat(pid) or (0, -1))[1] == start:
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.kill()


def test_sigterm_drains_then_stops_pouchdb(demo: Demo) -> None:
    assert demo.process is not None
    _drain_and_stop(demo, lambda: demo.process.send_signal(signal.SIGTERM), "SIGTERM")


def test_ctrl_c_drains_then_stops_pouchdb(demo: Demo) -> None:
    assert demo.process is not None
    # The terminal sends SIGINT to the whole foreground process group (make does not pass it on).
    _drain_and_stop(demo, lambda: os.killpg(demo.process.pid, signal.SIGINT), "SIGINT")


def _drain_and_stop(demo: Demo, interrupt: Callable[[], None], name: str) -> None:
    """Start a slow download, interrupt the demo: the download completes, then everything stops."""
    assert demo.process is not None
    commands = [line for _, line in demo.children.values()]
    assert any("pouchdb-server" in line for line in commands), commands
    assert any("twist" in line for line in commands), commands
    admin = demo.admin()
    data = os.urandom(SIZE)
    admin.put("demo", "big", {"download_token": TOKEN})
    admin.put_attachment("demo", "big", "big.bin", data)
    link = LINK.search(demo.log())
    assert link is not None
    try:
        hello = _download(demo.port, link.group(2))
        assert hello.endswith(b"\r\n\r\nHello from couchtoken!\n"), hello

        sock = start_download(demo.port, f"/demo/big/big.bin?token={TOKEN}")
        head, body = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        interrupt()
        deadline = time.monotonic() + 10
        while _listening(demo.port):
            assert time.monotonic() < deadline, "the port still accepts connections"
            body += sock.recv(65536)
        while len(body) < SIZE and (chunk := sock.recv(65536)):
            body += chunk
            time.sleep(0.002)
        sock.close()
        assert len(body) == SIZE, f"{len(body)} of {SIZE} bytes"
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        assert demo.process.wait(30) == 0
    except (OSError, AssertionError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{exc!r}\n{demo.log()[-4000:]}")
    log = demo.log()
    assert f"{name}: draining running downloads" in log
    assert "Draining 1 download(s)" in log
    assert "Drained: every download is sent" in log
    assert log.rstrip().endswith("Stopped")
    assert demo.alive_children() == []
    assert demo.leftovers() == []
    assert not _listening(demo.port)
    assert not _listening(demo.pouchdb_port)


def _download(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data
