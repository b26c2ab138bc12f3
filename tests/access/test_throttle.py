"""Guess throttling: 429 past --max-failures failed checks a minute by one client on one document."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from tests.faultproxy import Fault
from tests.http import fetch, raw_exchange

TOKEN = "throttle-token"


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", b"ok", "text/plain")
    return "doc"


@pytest_twisted.ensureDeferred
async def test_too_many_failures_answer_429_before_any_work(start_service, db, doc):
    service = await start_service(max_failures=5)
    for i in range(5):
        assert (await fetch(service.url(db, doc, "f.txt", f"guess-{i}"))).status == 403
    seen = len(service.couchdb_targets())
    blocked = await fetch(service.url(db, doc, "f.txt", "guess-6"))
    assert blocked.status == 429
    assert 1 <= int(blocked.header("retry-after")) <= 60
    assert blocked.json()["error"] == "too_many_requests"
    path = service.url(db, doc, "f.txt", "guess-7").split(service.base_url, 1)[1]
    raw = await deferToThread(
        raw_exchange,
        int(service.base_url.rsplit(":", 1)[1]),
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), raw[:60]
    # Even the right token waits out the window, and nothing reaches CouchDB meanwhile.
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 429
    assert len(service.couchdb_targets()) == seen
    # The 429 is for that document only.
    assert (await fetch(service.url(db, "other", "f.txt", "guess"))).status == 403


@pytest_twisted.ensureDeferred
async def test_other_clients_behind_a_trusted_proxy_are_unaffected(start_service, db, doc):
    service = await start_service(max_failures=3, trusted_proxies=("127.0.0.1",))
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    honest = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}  # the right-most untrusted address counts
    for _ in range(3):
        await fetch(service.url(db, doc, "f.txt", "wrong"), headers=guesser)
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN), headers=guesser)).status == 429
    assert (
        await fetch(service.url(db, doc, "f.txt", TOKEN), headers={"X-Forwarded-For": "198.51.100.9"})
    ).status == 200
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN), headers=honest)).status == 429


@pytest_twisted.ensureDeferred
async def test_forwarded_for_is_ignored_without_a_trusted_proxy(start_service, db, doc):
    service = await start_service(max_failures=2)
    for i in range(2):
        await fetch(service.url(db, doc, "f.txt", "wrong"), headers={"X-Forwarded-For": f"203.0.113.{i}"})
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 429


@pytest_twisted.ensureDeferred
async def test_a_burst_of_concurrent_guesses_gets_no_more_than_the_budget(start_service, db, doc):
    service = await start_service(max_failures=5)
    # CouchDB answers slowly: every guess is still being checked when the others arrive.
    service.proxy.fault = Fault("delay", matches=lambda target: target == f"/{db}/{doc}", seconds=1.0)
    replies = await defer.gatherResults(
        [defer.ensureDeferred(fetch(service.url(db, doc, "f.txt", f"guess-{i}"))) for i in range(60)]
    )
    statuses = sorted(reply.status for reply in replies)
    assert statuses == [403] * 5 + [429] * 55


@pytest_twisted.ensureDeferred
async def test_a_page_of_stale_links_still_gets_its_403s_and_valid_links_work(start_service, admin, db, doc):
    service = await start_service(max_failures=30, max_client_failures=300)  # the defaults
    stale = [
        defer.ensureDeferred(fetch(service.url(db, f"photo-{i}", "f.txt", "old-token"))) for i in range(40)
    ]
    assert [reply.status for reply in await defer.gatherResults(stale)] == [403] * 40
    reply = await fetch(service.url(db, doc, "f.txt", TOKEN))
    assert (reply.status, reply.body) == (200, b"ok")


@pytest_twisted.ensureDeferred
async def test_a_guess_sprayed_over_many_documents_meets_the_client_ceiling(start_service, db, doc):
    service = await start_service(max_failures=5, max_client_failures=10)
    for i in range(10):
        assert (await fetch(service.url(db, f"doc-{i}", "f.txt", "guess"))).status == 403
    assert (await fetch(service.url(db, "doc-10", "f.txt", "guess"))).status == 429
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 429


def _over_unix_socket(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(path)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_a_proxy_on_a_unix_socket_can_be_trusted(start_service, db, doc, tmp_path):
    service = await start_service(max_failures=2, trusted_proxies=("unix",))
    path = str(tmp_path / "couchtoken.sock")
    port = reactor.listenUNIX(path, service.app.site)
    try:

        async def status(token: str, client: str) -> int:
            request = (
                f"GET /{db}/{doc}/f.txt?token={token} HTTP/1.1\r\nHost: x\r\n"
                f"X-Forwarded-For: {client}\r\nConnection: close\r\n\r\n"
            )
            answer = await deferToThread(_over_unix_socket, path, request.encode())
            return int(answer.split(b" ", 2)[1])

        assert [await status("wrong", "203.0.113.7") for _ in range(3)] == [403, 403, 429]
        assert await status(TOKEN, "198.51.100.9") == 200  # another client behind the same proxy
        assert await status(TOKEN, "203.0.113.7") == 429
    finally:
        await port.stopListening()
