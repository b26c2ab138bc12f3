"""SIGTERM: the port closes, running downloads finish (up to --drain-timeout), the process exits 0."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import time

import pytest

from tests.h2client import H2Client
from tests.http import read_head, refuses_connections, start_download
from tests.seeding import random_attachment_db
from tests.tools import require_curl_with_http2
from tests.twistproc import TwistProcess

TOKEN = "drain-token"
SIZE = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def movie(admin):
    yield from random_attachment_db(admin, "ct-drain", TOKEN, "movie.bin", SIZE, "video/mp4")


@pytest.mark.parametrize("connection", ["close", "keep-alive"])
def test_sigterm_lets_a_running_download_finish_and_refuses_new_connections(
    movie, couch_server, tmp_path, connection
):
    db, digest = movie
    env = {"COUCHDB_URL": couch_server.url}
    service = TwistProcess(tmp_path / "twist.log", ["--drain-timeout", "20"], env=env)
    service.start()
    try:
        _drain_one_download(service, db, digest, connection)
    except (OSError, AssertionError) as exc:
        pytest.fail(f"{exc!r}\n{service.log()[-4000:]}")
    finally:
        service.stop()
    assert "draining" in service.log().lower()


def _drain_one_download(service: TwistProcess, db: str, digest: str, connection: str) -> None:
    """Start a download, SIGTERM the service, read the rest slowly; the service then exits at once."""
    sock = start_download(service.port, f"/{db}/doc/movie.bin?token={TOKEN}", connection=connection)
    head, body = read_head(sock)
    assert head.startswith(b"HTTP/1.1 200")
    service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not refuses_connections(service.port):
        assert time.monotonic() < deadline, "the port still accepts connections"
        body += sock.recv(65536)
    # Keep reading, slowly enough that the download outlives the SIGTERM by a while.
    started = time.monotonic()
    while len(body) < SIZE and (chunk := sock.recv(65536)):
        body += chunk
        time.sleep(0.004)
    assert time.monotonic() - started > 0.5
    assert len(body) == SIZE
    assert hashlib.sha256(body).hexdigest() == digest
    done = time.monotonic()
    assert service.process.wait(30) == 0
    assert time.monotonic() - done < 5, "the drain waited for the idle connection to time out"
    sock.close()


def test_sigterm_over_http2_sends_goaway_and_lets_running_streams_finish(movie, couch_server, tmp_path):
    """Every HTTP/2 connection gets GOAWAY: an idle one closes at once, a running stream is sent whole."""
    curl = require_curl_with_http2()
    db, digest = movie
    env = {"COUCHDB_URL": couch_server.url}
    service = TwistProcess(tmp_path / "twist.log", ["--drain-timeout", "20"], env=env, tls_dir=tmp_path)
    service.start()
    out = tmp_path / "movie.bin"
    try:
        idle = H2Client(service.port)
        assert idle.until(lambda: idle.remote_settings, 5)
        download = subprocess.Popen(
            [
                curl,
                "-sk",
                "--http2",
                "--limit-rate",
                "4M",
                "-o",
                str(out),
                "-w",
                "%{http_version} %{http_code}",
            ]
            + [f"{service.base_url}/{db}/doc/movie.bin?token={TOKEN}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not (out.exists() and out.stat().st_size > 1_000_000):
            assert time.monotonic() < deadline and download.poll() is None, service.log()[-2000:]
            time.sleep(0.05)
        service.process.send_signal(signal.SIGTERM)
        assert idle.until(lambda: idle.closed, 5), "the idle HTTP/2 connection is still open"
        assert idle.goaway is not None and idle.goaway.error_code == 0
        idle.close()  # as any client does once the server has closed
        assert refuses_connections(service.port) or time.sleep(1) or refuses_connections(service.port)
        outcome, errors = download.communicate(timeout=30)
        finished = time.monotonic()
        assert (download.returncode, outcome) == (0, b"2 200"), errors
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
        assert service.process.wait(30) == 0
        assert time.monotonic() - finished < 5, "the drain went on after the last stream was sent"
    except (OSError, AssertionError) as exc:
        pytest.fail(f"{exc!r}\n{service.log()[-4000:]}")
    finally:
        idle.close()
        service.stop()
    assert "Drained" in service.log()


def test_downloads_still_running_at_the_drain_timeout_are_cut(movie, couch_server, tmp_path):
    db, _ = movie
    env = {"COUCHDB_URL": couch_server.url}
    service = TwistProcess(tmp_path / "twist.log", ["--drain-timeout", "1"], env=env)
    service.start()
    try:
        sock = start_download(service.port, f"/{db}/doc/movie.bin?token={TOKEN}", connection="close")
        read_head(sock)  # then read nothing more: the download cannot finish
        stopped = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(15) == 0, service.log()[-2000:]
        assert 0.9 < time.monotonic() - stopped < 10
        sock.settimeout(5)
        received = 0
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
        assert received < SIZE
        sock.close()
    finally:
        service.stop()


def test_a_port_that_cannot_be_opened_exits_with_status_1(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    service = TwistProcess(tmp_path / "twist.log")
    service.port = taken.getsockname()[1]
    service.command[service.command.index("--port") + 1] = f"tcp:{service.port}:interface=127.0.0.1"
    try:
        result = subprocess.run(service.command, env=service.env, capture_output=True, text=True, timeout=30)
    finally:
        taken.close()
    assert result.returncode == 1
    assert "Cannot listen on" in result.stdout + result.stderr
