"""Oversized requests, slowloris and idle crowds: refused clearly, and others still served."""

from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from couchtoken.web.channel import GuardedHTTPChannel
from tests.http import fetch, raw_exchange

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
async def test_oversized_requests_get_414_or_431(service, raw, status):
    answer = await threads.deferToThread(raw_exchange, _port(service), raw)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert b"Traceback" not in answer
    assert service.couchdb_targets() == []


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
async def test_slowloris_clients_are_cut_and_others_served(service, db, doc, monkeypatch):
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
