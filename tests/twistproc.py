"""Run ``twist couchtoken`` as a real subprocess, the way users start it."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from couchtoken.dev.pouchdb import ROOT, free_port
from tests.tlscert import ssl_port


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class TwistProcess:
    """``twist couchtoken --port tcp:<free>:interface=127.0.0.1 [args]`` with the source tree's plugin.

    With ``tls_dir``, the port is ``ssl:`` with a fresh self-signed certificate kept there;
    ``descriptors`` lowers the process's soft limit on open file descriptors.
    """

    def __init__(
        self,
        log_path: Path,
        args: list[str] = (),
        env: dict[str, str] | None = None,
        descriptors: int | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.descriptors = descriptors
        self.scheme = "http" if tls_dir is None else "https"
        listen = f"tcp:{self.port}:interface=127.0.0.1" if tls_dir is None else ssl_port(tls_dir, self.port)
        self.log_path = log_path
        twist = Path(sys.executable).with_name("twist")
        command = [str(twist)] if twist.exists() else [sys.executable, "-m", "twisted"]
        self.command = command + [
            "--log-format",
            "text",
            "couchtoken",
            "--port",
            listen,
            *args,
        ]
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30, ready: Callable[[], bool] | None = None) -> None:
        """Start it; return once its port accepts connections (or ``ready()`` says so)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=self._limit_descriptors if self.descriptors else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"twist exited: {self.log_path.read_text()[-2000:]}")
            if ready is not None:
                if ready():
                    return
                time.sleep(0.1)
                continue
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("twist did not start listening")

    def _limit_descriptors(self) -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.descriptors, hard))

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far, from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def serving_pid(client: socket.socket, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of the TCP connection ``client`` (IPv4), from /proc."""
    server_port = client.getpeername()[1]
    client_port = client.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if (local_port, remote_port) == (server_port, client_port):
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None
