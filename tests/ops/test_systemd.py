"""The systemd units are valid, and the service runs on a socket passed the way systemd passes it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from couchtoken.dev.pouchdb import ROOT, free_port

UNITS = ROOT / "contrib" / "systemd"
TOKEN = "sd-token"


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: .ci/run installs Debian's systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    twist = Path(sys.executable).with_name("twist")
    for unit in ("couchtoken.service", "couchtoken.socket"):
        text = (UNITS / unit).read_text()
        # verify insists that ExecStart exists: point it at this environment's twist.
        (tmp_path / unit).write_text(text.replace("/opt/couchtoken/bin/twist", str(twist)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "couchtoken.service"), str(tmp_path / "couchtoken.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "couchtoken" not in result.stderr, result.stderr


def test_the_service_unit_keeps_secrets_off_the_command_line_and_hardens():
    service = (UNITS / "couchtoken.service").read_text()
    exec_start = next(line for line in service.splitlines() if line.startswith("ExecStart="))
    assert "systemd:domain=INET:index=0" in exec_start
    assert "--workers auto" in exec_start
    assert "couchdb-url" not in exec_start.replace("--couchdb-url-file", "")
    for setting in (
        "DynamicUser=yes",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
        "MemoryMax=",
        "KillMode=mixed",  # SIGTERM to the supervisor alone: it drains its workers
        "RuntimeDirectory=couchtoken",
        "LoadCredential=couchdb-url:",
        "COUCHDB_URL_FILE=%d/couchdb-url",
        "LimitNOFILE=65536",
        "CacheDirectory=couchtoken",
    ):
        assert setting in service, setting
    assert "--disk-cache-dir /var/cache/couchtoken" in exec_start


def _start_socket_activated(listener: socket.socket, couch_url: str, tmp_path: Path, *args: str):
    """``twist couchtoken --port systemd:...`` with ``listener`` as fd 3, LISTEN_FDS, LISTEN_FDNAMES and
    LISTEN_PID (its own pid), and the CouchDB URL in a credential file: as systemd starts it."""
    url_file = tmp_path / "couchdb-url"
    url_file.write_text(couch_url)
    twist = Path(sys.executable).with_name("twist")
    command = [str(twist)] if twist.exists() else [sys.executable, "-m", "twisted"]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "couchtoken.socket",  # systemd 227+ names every passed socket
        "COUCHDB_URL_FILE": str(url_file),
    }
    env.pop("COUCHDB_URL", None)
    # "exec" keeps the shell's pid, so LISTEN_PID=$$ names the service process itself.
    script = 'export LISTEN_PID=$$; exec "$@"'
    log = open(tmp_path / "twist.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            "sh",
            "-c",
            script,
            "sh",
            *command,
            "--log-format",
            "text",
            "couchtoken",
            "--port",
            "systemd:domain=INET:index=0",
            *args,
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        pass_fds=(3,),
        preexec_fn=None if listener.fileno() == 3 else (lambda: os.dup2(listener.fileno(), 3)),
    )
    log.close()
    listener.close()  # only the service holds it now
    return process


def _listener() -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener, listener.getsockname()[1]


def test_the_service_runs_on_an_inherited_listening_socket(couch_server, admin, db, tmp_path):
    """systemd passes the socket as fd 3, with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its pid)."""
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "hello.txt", b"socket activated", "text/plain")
    listener, port = _listener()
    process = _start_socket_activated(listener, couch_server.url, tmp_path)
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/{db}/doc/hello.txt?token={TOKEN}", timeout=5
                ) as response:
                    body = response.read()
            except OSError:
                if process.poll() is not None:
                    pytest.fail((tmp_path / "twist.log").read_text())
                time.sleep(0.2)
        assert body == b"socket activated", (tmp_path / "twist.log").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "twist.log").read_text()[-3000:]


def test_workers_share_an_inherited_listening_socket(couch_server, admin, db, tmp_path):
    """``--workers 2`` on systemd's one socket: both workers accept on it; SIGTERM stops them all."""
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "hello.txt", b"socket activated", "text/plain")
    listener, port = _listener()
    metrics = free_port()
    process = _start_socket_activated(
        listener, couch_server.url, tmp_path, "--workers", "2", "--metrics-port", f"tcp:{metrics}"
    )
    url = f"http://127.0.0.1:{port}/{db}/doc/hello.txt?token={TOKEN}"

    def fetch(_: object) -> bytes:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def requests_per_worker() -> list[float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/_metrics", timeout=10) as response:
            text = response.read().decode()
        return [
            float(v)
            for v in re.findall(r'^couchtoken_worker_requests_total\{worker="\d"\} (\S+)', text, re.M)
        ]

    try:
        deadline = time.monotonic() + 60
        while True:
            with ThreadPoolExecutor(8) as pool:
                assert set(pool.map(fetch, range(16))) == {b"socket activated"}
            served = requests_per_worker()
            if len(served) == 2 and all(served):
                break
            assert time.monotonic() < deadline, f"one worker took every connection: {served}"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "twist.log").read_text()[-3000:]
    log = (tmp_path / "twist.log").read_text()
    assert "All workers stopped" in log and "Traceback" not in log
