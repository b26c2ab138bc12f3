"""Hostile paths and headers: nothing but the named document and attachment reaches CouchDB."""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from tests.faultproxy import Fault
from tests.http import raw_exchange
from tests.waiting import wait_until

TOKEN = "tok"
# Everything the service may ever ask CouchDB for: one document, one of its
# attachments pinned to a revision, a database's changes feed, (on servers that
# keep the feeds of deleted databases) its latest change, the global _db_updates
# feed, a database's update_seq and its changes since a seq.  No database or
# document name starts with "_".
ALLOWED = re.compile(
    r"GET /(?!_)[^/?]+/(?!_)[^/?]+(/[^?]+\?rev=[0-9]+-[0-9a-f]+|\?att_encoding_info=true)\Z"
    r"|GET /(?!_)[^/?]+/_changes\?feed=continuous&heartbeat=[0-9]+&since=now\Z"
    r"|GET /(?!_)[^/?]+/_changes\?descending=true&limit=1\Z"
    r"|GET /_db_updates\?feed=continuous&heartbeat=[0-9]+&since=now\Z"  # the global feed
    r"|GET /(?!_)[^/?]+\Z"  # a database's update_seq: its baseline under the global feed
    r"|GET /(?!_)[^/?]+/_changes\?since=[0-9A-Za-z_%-]+&limit=[0-9]+\Z"  # a catch-up read
    r"|GET /_up\Z|GET /\Z"  # the health check (at start, and for /_health); the server's kind
)


def _raw_request(port: int, request_line: bytes, headers: bytes = b"") -> bytes:
    return raw_exchange(
        port, request_line + b"\r\nHost: localhost\r\nConnection: close\r\n" + headers + b"\r\n"
    )


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


HOSTILE_TARGETS = [
    b"/",
    b"/db",
    b"/db/doc",
    b"/db/doc/",
    b"//doc/file",
    b"/db//file",
    b"/db/doc//file",
    b"/db/../file",
    b"/db/doc/../../_users/x",
    b"/db/%2E%2E/file",
    b"/db/doc/sub/%2e%2e/x",
    b"/db/a%2F..%2F_design%2Fx/file",
    b"/db/.%2F/file",
    b"/db/doc/.",
    b"/_users/org.couchdb.user:admin/x",
    b"/_replicator/doc/x",
    b"/%5Fusers/doc/x",
    b"/db/_design%2Fddoc/x",
    b"/db/_local%2Fthing/x",
    b"/db/_all_docs/x",
    b"/db/_changes/x",
    b"/db/%5Fdesign%2Fddoc/x",
    b"/DB/doc/x",
    b"/1db/doc/x",
    b"/db%00/doc/x",
    b"/db/doc%00/x",
    b"/db/doc/file%00.txt",
    b"/db/doc/file%0d%0aSet-Cookie:%20a=b",
    b"/db/%FF%FE/x",
    b"/db/doc/%C3%28",
    b"/db/" + b"a" * 5000 + b"/x",
    b"http://evil.example/db/doc/x",
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("target", HOSTILE_TARGETS, ids=[t[:40].decode("latin-1") for t in HOSTILE_TARGETS])
async def test_malformed_or_forbidden_paths_never_reach_couchdb(service, admin, db, target):
    admin.put(db, "doc", {"download_token": TOKEN})
    port = int(service.base_url.rsplit(":", 1)[1])
    raw = await threads.deferToThread(
        _raw_request, port, b"GET " + target + b"?token=" + TOKEN.encode() + b" HTTP/1.1"
    )
    assert _status(raw) in (400, 403), raw[:300]
    assert b"Traceback" not in raw
    assert service.couchdb_targets() == []


@pytest_twisted.ensureDeferred
async def test_asterisk_form_is_refused_by_the_web_server(service):
    port = int(service.base_url.rsplit(":", 1)[1])
    raw = await threads.deferToThread(_raw_request, port, b"GET * HTTP/1.1")
    assert _status(raw) == 405
    assert service.couchdb_targets() == []


@pytest_twisted.ensureDeferred
async def test_everything_sent_upstream_is_an_allowed_get(service, admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file.txt", b"x")
    for path in ("doc/file.txt", "doc/other.txt", "nodoc/file.txt", "doc/a%2Fb", "doc/file.txt%3Frev=1"):
        await service.get(f"{service.base_url}/{db}/{path}?token={TOKEN}&rev=1-abc&attachments=true")
        await service.get(f"{service.base_url}/{db}/{path}?token=wrong&open_revs=all")
    if any(feed.checks for feed in service.app.feeds.feeds()):  # PouchDB Server: see a database check
        assert await wait_until(lambda: any("limit=1" in t for t in service.couchdb_targets(feeds=True)), 3)
    targets = service.couchdb_targets(health_checks=True, feeds=True)
    assert targets
    for target in targets:
        assert ALLOWED.match(target), target
    assert all("attachments=true" not in t and "open_revs" not in t for t in targets)


@pytest_twisted.ensureDeferred
async def test_client_credentials_never_reach_couchdb(service, admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file.txt", b"x")
    reply = await service.get(
        service.url(db, "doc", "file.txt", TOKEN),
        headers={
            "Authorization": "Basic bWFsbG9yeTpldmls",
            "Cookie": "AuthSession=stolen",
            "X-Forwarded-For": "1.2.3.4",
        },
    )
    assert reply.status == 200
    seen = service.proxy.requests
    assert seen
    for request in seen:
        assert request.headers.get("authorization") != "Basic bWFsbG9yeTpldmls"
        assert "cookie" not in request.headers
        assert "x-forwarded-for" not in request.headers


@pytest_twisted.ensureDeferred
async def test_upstream_cookies_and_auth_challenges_never_reach_the_client(service, admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file.txt", b"payload")
    service.proxy.fault = Fault(
        "inject",
        headers=b"Set-Cookie: AuthSession=admin-session\r\nWWW-Authenticate: Basic realm=couch\r\n",
    )
    reply = await service.get(service.url(db, "doc", "file.txt", TOKEN))
    assert (reply.status, reply.body) == (200, b"payload")
    assert reply.header("set-cookie") is None
    assert reply.header("www-authenticate") is None


@pytest_twisted.ensureDeferred
async def test_no_traceback_reaches_a_client(service, admin, db, monkeypatch):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file.txt", b"x")

    def explode(*args, **kwargs):
        raise RuntimeError("internal detail that must stay inside")

    monkeypatch.setattr("couchtoken.access.documents.DocumentSummary.accepts", explode)
    reply = await service.get(service.url(db, "doc", "file.txt", TOKEN))
    assert reply.status == 500
    assert b"internal detail" not in reply.body
    assert b"Traceback" not in reply.body
    assert reply.json() == {"error": "internal_error", "reason": "internal error"}
    assert reactor.running
