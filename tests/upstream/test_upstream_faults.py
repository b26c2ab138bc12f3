"""CouchDB unreachable, slow or broken: 502/504 quickly, and recovery by itself.

Faults a real server cannot produce on demand come from the FaultProxy fake.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import ResponseFailed

from couchtoken.dev.pouchdb import free_port
from tests.faultproxy import Fault
from tests.http import fetch

TOKEN = "tok"


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file.txt", b"x" * 300_000, "application/octet-stream")
    return "doc"


@pytest_twisted.ensureDeferred
async def test_couchdb_refusing_connections_is_a_quick_502(start_service, db):
    service = await start_service(couchdb_url=f"http://admin:pw@127.0.0.1:{free_port()}")
    started = time.monotonic()
    reply = await service.get(service.url(db, "doc", "file.txt", TOKEN))
    assert reply.status == 502
    assert reply.json()["error"] == "bad_gateway"
    assert time.monotonic() - started < 2


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("kind", ["garbage", "reset"])
async def test_garbage_or_a_dropped_connection_is_502_then_recovers(service, db, doc, kind):
    service.proxy.fault = Fault(kind)
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN))
    assert reply.status == 502
    service.proxy.fault = None
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN))
    assert (reply.status, len(reply.body)) == (200, 300_000)


@pytest_twisted.ensureDeferred
async def test_an_unanswered_request_is_504_after_the_response_timeout(start_service, db, doc):
    service = await start_service(response_timeout=0.5)
    service.proxy.fault = Fault("stall")
    started = time.monotonic()
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN))
    assert reply.status == 504
    assert reply.json()["error"] == "gateway_timeout"
    assert 0.4 < time.monotonic() - started < 3
    service.proxy.fault = None
    assert (await service.get(service.url(db, doc, "file.txt", TOKEN))).status == 200


@pytest_twisted.ensureDeferred
async def test_a_stalled_attachment_request_is_504_too(start_service, db, doc):
    service = await start_service(response_timeout=0.5)
    service.proxy.fault = Fault("stall", matches=lambda target: "file.txt" in target)
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN))
    assert reply.status == 504


@pytest.fixture
def unaccepting_port():
    """A loopback port whose accept queue is full: new connections hang in SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_that_never_completes_is_504_after_the_connect_timeout(
    start_service, db, unaccepting_port
):
    service = await start_service(couchdb_url=f"http://127.0.0.1:{unaccepting_port}", connect_timeout=0.5)
    started = time.monotonic()
    reply = await service.get(service.url(db, "doc", "file.txt", TOKEN))
    assert reply.status == 504
    assert time.monotonic() - started < 3


@pytest_twisted.ensureDeferred
async def test_wrong_admin_credentials_are_a_502_with_a_clear_log_line(
    start_service, couch_server, db, doc, logged
):
    from couchtoken.dev.pouchdb import CouchAdmin

    admin = CouchAdmin(couch_server.url)
    # A throwaway user, not the admin: CouchDB 3 locks a (user, IP) out after 5 failed logins
    # in 5 minutes ([chttpd_auth_lockout]), which would lock the suite's own admin account.
    service = await start_service(
        couchdb_url=f"http://nobody-{uuid.uuid4().hex[:8]}:not-the-password@{admin.host}:{admin.port}"
    )
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN))
    assert reply.status == 502
    messages = [e.get("log_format", "") for e in logged]
    assert any("CouchDB failed" in m for m in messages)
    assert any(e.get("kind") == "unauthorized" for e in logged)


@pytest_twisted.ensureDeferred
async def test_an_upstream_dying_mid_body_aborts_the_client_response(service, db, doc):
    service.proxy.fault = Fault("cut", matches=lambda target: "file.txt" in target, after=100_000)
    with pytest.raises(ResponseFailed):
        await fetch(service.url(db, doc, "file.txt", TOKEN))
    service.proxy.fault = None
    reply = await fetch(service.url(db, doc, "file.txt", TOKEN))
    assert (reply.status, len(reply.body)) == (200, 300_000)


@pytest_twisted.ensureDeferred
async def test_an_upstream_dying_mid_range_aborts_the_client_response(service, db, doc):
    service.proxy.fault = Fault("cut", matches=lambda target: "file.txt" in target, after=50_000)
    with pytest.raises(ResponseFailed):
        await fetch(service.url(db, doc, "file.txt", TOKEN), headers={"Range": "bytes=1000-250000"})
    await deferLater(reactor, 0.1)


@pytest_twisted.ensureDeferred
async def test_a_compressed_answer_to_a_range_is_a_clean_502(service, db, doc):
    """Range is asked for identity bytes; a gzip answer cannot be sliced, and no stray header leaks."""
    service.proxy.fault = Fault(
        "inject", matches=lambda target: "file.txt" in target, headers=b"Content-Encoding: gzip\r\n"
    )
    reply = await fetch(service.url(db, doc, "file.txt", TOKEN), headers={"Range": "bytes=0-9"})
    assert reply.status == 502
    assert reply.json()["error"] == "bad_gateway"
    for header in ("content-encoding", "etag", "content-range", "accept-ranges"):
        assert reply.header(header) is None, header


def couchtoken_warnings(events):
    return [
        e
        for e in events
        if e.get("log_level") is not None
        and e["log_level"].name in ("warn", "error", "critical")
        and e.get("log_namespace", "").startswith("couchtoken")
    ]


@pytest_twisted.ensureDeferred
async def test_an_upstream_stalling_after_the_headers_is_an_aborted_response(start_service, db, doc, logged):
    service = await start_service(response_timeout=1.0)
    service.proxy.fault = Fault("stall-after-headers", matches=lambda target: "file.txt" in target)
    started = time.monotonic()
    with pytest.raises(ResponseFailed):
        await fetch(service.url(db, doc, "file.txt", TOKEN))
    assert time.monotonic() - started < 5
    assert len(couchtoken_warnings(logged)) == 1
    assert "no attachment bytes" in couchtoken_warnings(logged)[0]["log_format"]
    service.proxy.fault = None
    reply = await fetch(service.url(db, doc, "file.txt", TOKEN))
    assert (reply.status, len(reply.body)) == (200, 300_000)


@pytest_twisted.ensureDeferred
async def test_a_bandwidth_capped_upstream_still_delivers_byte_exact(service, admin, db, doc):
    service.proxy.fault = Fault("throttle", matches=lambda target: "file.txt" in target, rate=400_000)
    started = time.monotonic()
    reply = await fetch(service.url(db, doc, "file.txt", TOKEN))
    assert (reply.status, reply.body) == (200, b"x" * 300_000)
    assert time.monotonic() - started > 0.5


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "fault,expect",
    [
        (Fault("garbage", matches=lambda target: "_changes" not in target), 502),
        (Fault("reset", matches=lambda target: "_changes" not in target), 502),
        (Fault("cut", matches=lambda target: "file.txt" in target, after=100_000), "aborted"),
    ],
    ids=["garbage-status-line", "reset-before-headers", "reset-mid-body"],
)
async def test_each_fault_gets_its_answer_one_log_line_and_then_recovery(
    service, db, doc, logged, fault, expect
):
    service.proxy.fault = fault
    try:
        reply = await fetch(service.url(db, doc, "file.txt", TOKEN))
        outcome = reply.status
    except ResponseFailed:
        outcome = "aborted"
    assert outcome == expect
    assert len(couchtoken_warnings(logged)) == 1, [e["log_format"] for e in couchtoken_warnings(logged)]
    service.proxy.fault = None
    reply = await fetch(service.url(db, doc, "file.txt", TOKEN))
    assert (reply.status, len(reply.body)) == (200, 300_000)
