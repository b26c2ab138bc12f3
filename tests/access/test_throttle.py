"""Guess throttling: 429 past --max-failures failed checks a minute from one client address."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

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
