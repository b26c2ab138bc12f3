"""--max-connections is a hard bound on the requests (and so connections) open at CouchDB at once.

Feeds are counted apart; these tests run without the cache, so there are none, and every
download is a document read plus an attachment read.  Slow downloads come from the
FaultProxy's bandwidth cap (a fake: a real server is fast here).
"""

from __future__ import annotations

import os
import time

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import Clock
from twisted.web.client import ResponseFailed

from couchtoken.upstream.slots import ConnectionSlots, QueueTimeout
from tests.faultproxy import Fault
from tests.http import fetch, start_download
from tests.waiting import wait_until

TOKEN = "bound"
BODY = os.urandom(100_000)


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.bin", BODY, "application/octet-stream")
    return "doc"


def slow_attachments(rate: int) -> Fault:
    return Fault("throttle", matches=lambda target: "f.bin" in target, rate=rate)


@pytest_twisted.ensureDeferred
async def test_many_slow_downloads_never_open_more_than_max_connections(start_service, db, doc):
    service = await start_service(max_connections=4, cache_size=0, blob_cache_bytes=0)
    service.proxy.fault = slow_attachments(1_000_000)  # 0.1 s a download
    url = service.url(db, doc, "f.bin", TOKEN)
    replies = await DeferredList([ensureDeferred(fetch(url)) for _ in range(60)], consumeErrors=True)
    assert [(r.status, r.body == BODY) if ok else repr(r) for ok, r in replies] == [(200, True)] * 60
    assert service.proxy.peak_open <= 4, f"{service.proxy.peak_open} connections to CouchDB at once"


@pytest_twisted.ensureDeferred
async def test_a_request_that_waits_too_long_for_a_connection_gets_504(start_service, db, doc):
    service = await start_service(max_connections=1, cache_size=0, blob_cache_bytes=0, response_timeout=1)
    service.proxy.fault = slow_attachments(40_000)  # 2.5 s: holds the only slot
    slow = ensureDeferred(fetch(service.url(db, doc, "f.bin", TOKEN)))
    await wait_until(lambda: service.app.client.slots.in_use == 1, 2)
    started = time.monotonic()
    queued = ensureDeferred(fetch(service.url(db, doc, "f.bin", TOKEN)))
    assert await wait_until(lambda: service.app.client.slots.waiting == 1, 0.5)
    metrics = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
    assert "couchtoken_upstream_requests 1.0" in metrics and "couchtoken_upstream_queued 1.0" in metrics
    waiting = await queued
    assert waiting.status == 504
    assert 0.8 < time.monotonic() - started < 3.0
    assert (await slow).body == BODY
    service.proxy.fault = None
    assert (await fetch(service.url(db, doc, "f.bin", TOKEN))).status == 200
    assert service.proxy.peak_open == 1


@pytest_twisted.ensureDeferred
async def test_downloads_cut_off_or_broken_give_their_connection_back(start_service, db, doc):
    service = await start_service(max_connections=2, cache_size=0, blob_cache_bytes=0, response_timeout=2)
    service.proxy.fault = slow_attachments(50_000)
    url = service.url(db, doc, "f.bin", TOKEN)
    port = int(service.base_url.rsplit(":", 1)[1])
    # Raw sockets, closed: a cancelled client library request may go on reading the body.
    leaving = [await threads.deferToThread(start_download, port, f"/{db}/{doc}/f.bin?token={TOKEN}")]
    leaving.append(await threads.deferToThread(start_download, port, f"/{db}/{doc}/f.bin?token={TOKEN}"))
    assert await wait_until(lambda: service.app.client.slots.in_use == 2, 3)
    for sock in leaving:
        sock.close()  # the clients go away mid-body
    assert await wait_until(lambda: service.app.client.slots.in_use == 0, 1), (
        "a client that left kept its slot"
    )
    service.proxy.fault = Fault("cut", matches=lambda target: "f.bin" in target, after=50_000)
    for _ in range(3):
        with pytest.raises(ResponseFailed):
            await fetch(url)  # CouchDB breaks off mid-body: the client sees a broken transfer
    assert await wait_until(lambda: service.app.client.slots.in_use == 0, 3), "a broken read kept its slot"
    service.proxy.fault = None
    assert (await fetch(url)).body == BODY
    assert service.proxy.peak_open <= 3  # two, and one being torn down as the next one opens


def test_slots_queue_in_order_and_a_waiter_that_times_out_leaves_the_queue():
    clock = Clock()
    slots = ConnectionSlots(1, clock, timeout=5)
    first = ensureDeferred(slots.acquire())
    second = ensureDeferred(slots.acquire())
    third = ensureDeferred(slots.acquire(timeout=1))
    assert first.called and not second.called and slots.waiting == 2
    clock.advance(1)
    assert isinstance(third.result.value, QueueTimeout)
    third.addErrback(lambda failure: None)
    assert slots.waiting == 1
    release = first.result
    release()
    release()  # twice is harmless
    assert second.called and slots.in_use == 1 and slots.waiting == 0
    second.result()
    assert slots.in_use == 0


def test_a_cancelled_waiter_leaves_the_queue():
    slots = ConnectionSlots(1, Clock(), timeout=5)
    first = ensureDeferred(slots.acquire())
    waiter = ensureDeferred(slots.acquire())
    waiter.cancel()
    waiter.addErrback(lambda failure: None)
    assert slots.waiting == 0
    first.result()
    assert slots.in_use == 0
