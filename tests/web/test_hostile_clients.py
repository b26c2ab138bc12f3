"""Oversized requests, slowloris and idle crowds: refused clearly, and others still served."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from couchtoken.web.channel import GuardedHTTPChannel
from couchtoken.web.connections import ConnectionLimit, client_connection_limit
from tests.faultproxy import Fault, FaultProxy
from tests.http import fetch, raw_exchange
from tests.logs import access_lines
from tests.twistproc import TwistProcess

TOKEN = "hostile-token"


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", b"still served", "text/plain")
    return "doc"


def _port(service) -> int:
    return int(service.base_url.rsplit(":", 1)[1])


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "raw,status",
    [
        (b"GET /db/doc/" + b"a" * 9000 + b"?token=x HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /db/doc/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /db/doc/f HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
        (
            b"GET /db/doc/f HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"d" * 100) for i in range(200))
            + b"\r\n",
            431,
        ),
    ],
    ids=["long-uri", "endless-uri", "huge-header", "many-headers"],
)
async def test_oversized_requests_get_414_or_431(service, logged, raw, status):
    answer = await threads.deferToThread(raw_exchange, _port(service), raw)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"Traceback" not in answer
    assert service.couchdb_targets() == []
    (line,) = access_lines(logged)
    assert line["status"] == status and line["bytes"] == len(answer), line
    assert "token=x" not in line["line"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "method,framing",
    [
        ("GET", "Content-Length: 200000000"),
        ("GET", "Content-Length: 1"),
        ("HEAD", "Content-Length: 5000"),
        ("GET", "Transfer-Encoding: chunked"),
        ("POST", "Content-Length: 200000000"),
        ("OPTIONS", "Transfer-Encoding: chunked"),
    ],
)
async def test_a_request_body_is_refused_before_it_is_read(service, db, doc, logged, method, framing):
    raw = (
        f"{method} /{db}/doc/f.txt?token={TOKEN} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n"
        "the start of a body that never ends"
    ).encode()
    answer = await threads.deferToThread(raw_exchange, _port(service), raw, 5)
    assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "content_too_large"
    assert service.couchdb_targets() == []
    assert not any(e.get("log_failure") for e in logged)
    # Logged as any answer, the token redacted.
    (line,) = access_lines(logged)
    assert (line["status"], line["method"], line["protocol"]) == (413, method, "HTTP/1.1"), line
    assert line["uri"] == f"/{db}/doc/f.txt?token=REDACTED" and TOKEN not in line["line"], line
    assert line["line"].startswith("127.0.0.1 - - ["), line["line"]
    # Content-Length: 0 is no body.
    empty = (
        f"GET /{db}/doc/f.txt?token={TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    answer = await threads.deferToThread(raw_exchange, _port(service), empty, 5)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"still served"), answer[:200]


@pytest_twisted.ensureDeferred
async def test_header_injection_attempts_are_not_reflected(service, db, doc):
    raw = (
        f"GET /{db}/doc/f.txt?token={TOKEN}%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: x\r\n"
        f"Range: bytes=0-1\r\nSet-Cookie: evil=1\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = await threads.deferToThread(raw_exchange, _port(service), raw)
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert b"set-cookie" not in head.lower()
    assert head.startswith(b"HTTP/1.1 403")


@pytest_twisted.ensureDeferred
async def test_slowloris_clients_are_cut_and_others_served(service, db, doc, logged, monkeypatch):
    monkeypatch.setattr(GuardedHTTPChannel, "header_timeout", 1.0)
    port = _port(service)

    def trickle(count: int, seconds: float) -> list[bytes]:
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        for sock in sockets:
            sock.sendall(b"GET /db/doc/f HTTP/1.1\r\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for sock in sockets:
                try:
                    sock.sendall(b"X: y\r\n")
                except OSError:
                    pass
            time.sleep(0.2)
        answers = []
        for sock in sockets:
            try:
                answers.append(sock.recv(4096))
            except OSError:
                answers.append(b"")
            sock.close()
        return answers

    trickling = threads.deferToThread(trickle, 50, 2.0)
    started = time.monotonic()
    for _ in range(10):
        reply = await fetch(service.url(db, doc, "f.txt", TOKEN))
        assert (reply.status, reply.body) == (200, b"still served")
    assert time.monotonic() - started < 2
    answers = await trickling
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    cut = [line for line in access_lines(logged) if line["status"] == 408]
    assert len(cut) == 50 and all(line["uri"] == "/db/doc/f" for line in cut), cut[:2]
    assert all(1.0 <= line["duration_ms"] / 1000 < 5 for line in cut), [line["duration_ms"] for line in cut]


@pytest_twisted.ensureDeferred
async def test_a_crowd_of_idle_connections_does_not_stop_others(service, db, doc):
    port = _port(service)
    idle = await threads.deferToThread(
        lambda: [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
    )
    try:
        started = time.monotonic()
        for _ in range(10):
            assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 200
        assert time.monotonic() - started < 2
    finally:
        for sock in idle:
            sock.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("first", [b"", b"\r\n"], ids=["fresh", "after-a-stray-crlf"])
async def test_a_request_line_trickled_without_an_end_is_cut(service, logged, monkeypatch, first):
    monkeypatch.setattr(GuardedHTTPChannel, "header_timeout", 1.0)
    port = _port(service)

    def trickle() -> tuple[bytes, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(first)
            for byte in b"GET /db/doc/" + b"a" * 100:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                ready = sock.recv(4096) if _readable(sock, 0.2) else None
                if ready is not None:
                    return ready, time.monotonic() - started
            return b"", time.monotonic() - started

    answer, seconds = await threads.deferToThread(trickle)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert seconds < 5
    (line,) = access_lines(logged)
    assert (line["status"], line["method"], line["uri"]) == (408, "-", "-"), line


def _readable(sock: socket.socket, seconds: float) -> bool:
    import select

    return bool(select.select([sock], [], [], seconds)[0])


def test_the_client_connection_budget_leaves_room_for_couchdb():
    # 1024 descriptors: 32 pooled connections, 100 feeds and 64 spare leave 828,
    # shared half and half between clients and the downloads' CouchDB connections.
    assert client_connection_limit(1024, pool=32, feeds=100, max_downloads=1000) == 414
    # Plenty of descriptors: each of the 1000 downloads gets its CouchDB connection.
    assert client_connection_limit(65536, pool=32, feeds=100, max_downloads=1000) == 64340
    assert client_connection_limit(1024, pool=32, feeds=100, max_downloads=10) == 818
    assert client_connection_limit(100, pool=32, feeds=100, max_downloads=10) == 1
    assert client_connection_limit(-1, pool=32, feeds=100, max_downloads=10) is None  # RLIM_INFINITY
    limit = ConnectionLimit(2)
    assert limit.admit()
    limit.opened()
    limit.opened()
    assert not limit.admit() and not limit.admit()
    limit.closed()
    assert limit.admit()
    assert (limit.open, limit.refused) == (1, 2)
    assert ConnectionLimit(None).admit()


def _request(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET on ``sock``; the whole response (it has a Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n", 1)[0] + b"\r\n\r\n" + body


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_out_of_descriptors_new_connections_are_refused_and_downloads_go_on(
    couch_server, admin, db, doc, tmp_path
):
    """A crowd of idle connections larger than the descriptor limit allows, against a real ``twist``."""
    proxy = FaultProxy(reactor, admin.host, admin.port)  # to hold CouchDB's answers: downloads overlap
    await proxy.start()
    creds = f"{quote(admin.user or '', safe='')}:{quote(admin.password or '', safe='')}@"
    twist = TwistProcess(
        tmp_path / "twist.log",
        ["--max-feeds", "10", "--max-connections", "2"],
        env={"COUCHDB_URL": f"http://{creds if admin.user else ''}{proxy.url_host}"},
        descriptors=200,  # 62 client connections at most
    )
    await threads.deferToThread(twist.start)
    path = f"/{db}/{doc}/f.txt?token={TOKEN}"
    crowd: list[socket.socket] = []
    try:
        await threads.deferToThread(urllib.request.urlopen, twist.base_url + path, timeout=10)
        clients = [socket.create_connection(("127.0.0.1", twist.port), timeout=10) for _ in range(3)]

        def fill() -> int:
            """Open 400 idle connections; count those the service closed at once."""
            for _ in range(400):
                crowd.append(socket.create_connection(("127.0.0.1", twist.port), timeout=10))
            closed = 0
            for sock in crowd:
                if _readable(sock, 0.05) and sock.recv(1) == b"":
                    closed += 1
            return closed

        refused = await threads.deferToThread(fill)
        assert refused >= 300, refused
        # Downloads on connections already open go on, each with a CouchDB connection of its own.
        proxy.fault = Fault("delay", matches=lambda target: "f.txt" in target, seconds=0.5)
        answers = await defer.gatherResults([threads.deferToThread(_request, sock, path) for sock in clients])
        for answer in answers:
            assert answer == b"HTTP/1.1 200 OK\r\n\r\nstill served", answer[:300]
        proxy.fault = None
        cpu = twist.cpu_seconds()
        await threads.deferToThread(time.sleep, 2)
        assert twist.cpu_seconds() - cpu < 0.5, "the service spins while the crowd waits"
        assert twist.process.poll() is None
        for sock in crowd + clients:
            sock.close()
        crowd.clear()
        # Once the crowd is gone, new clients are served again.
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = await threads.deferToThread(urllib.request.urlopen, twist.base_url + path, timeout=5)
                assert reply.read() == b"still served"
                break
            except OSError:
                assert time.monotonic() < deadline, "not served again after the crowd left"
                await threads.deferToThread(time.sleep, 0.2)
    finally:
        for sock in crowd:
            sock.close()
        await threads.deferToThread(twist.stop)
        await proxy.stop()
    log = twist.log()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("refusing new ones until some close") == 1, log[-3000:]
