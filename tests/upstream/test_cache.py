"""The token cache and its _changes feeds, end to end against the real server."""

from __future__ import annotations

import contextlib
import time

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred

from couchtoken.upstream.client import DOCUMENT_QUERY
from tests.http import fetch
from tests.waiting import wait_until

TOKEN = "t0ken"
HEARTBEAT = 0.2  # seconds: feeds go live fast, and silent ones are noticed in 1.4 s


def doc_requests(service, db, docid="doc"):
    return [t for t in service.couchdb_targets() if t == f"GET /{db}/{docid}?{DOCUMENT_QUERY}"]


def attachment_requests(service, db):
    return [t for t in service.couchdb_targets() if "?rev=" in t and t.startswith(f"GET /{db}/")]


async def warm(service, db, docid="doc", attachment="f.txt", token=TOKEN, timeout=5):
    """Make the document cached: wait for its feed, then look it up once."""
    await fetch(service.url(db, docid, attachment, token), "HEAD")
    feeds = service.app.feeds
    assert await wait_until(lambda: any(f.db == db and f.fresh() for f in feeds.feeds()), timeout), (
        "feed never live"
    )
    await fetch(service.url(db, docid, attachment, token), "HEAD")
    before = len(doc_requests(service, db, docid))
    await fetch(service.url(db, docid, attachment, token), "HEAD")
    assert len(doc_requests(service, db, docid)) == before, "the document is not cached"


@contextlib.contextmanager
def databases(admin, prefix, count):
    """``count`` fresh databases, each with ``doc`` (token ``TOKEN``) holding ``f.txt``; deleted after."""
    names = [f"{prefix}-{i:02d}-{time.monotonic_ns() % 10**8}" for i in range(count)]
    try:
        for name in names:
            admin.create_db(name)
            admin.put(name, "doc", {"download_token": TOKEN})
            admin.put_attachment(name, "doc", "f.txt", b"x")
        yield names
    finally:
        for name in names:
            admin.delete_db(name)


async def until_status(url, status, timeout=1.0):
    """Poll ``url`` until it answers ``status``; returns the seconds it took (or None)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if (await fetch(url)).status == status:
            return time.monotonic() - started
    return None


@pytest.fixture
async def cached(start_service):
    return await start_service(feed_heartbeat=HEARTBEAT)


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", b"cached body", "text/plain")
    return "doc"


@pytest_twisted.ensureDeferred
async def test_warm_downloads_make_only_the_attachment_request(start_service, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT, blob_cache_bytes=0)
    await warm(service, db)
    docs_before = len(doc_requests(service, db))
    atts_before = len(attachment_requests(service, db))
    for _ in range(10):
        reply = await fetch(service.url(db, doc, "f.txt", TOKEN))
        assert (reply.status, reply.body) == (200, b"cached body")
    assert len(doc_requests(service, db)) == docs_before
    assert len(attachment_requests(service, db)) == atts_before + 10


@pytest_twisted.ensureDeferred
async def test_warm_refusals_404s_and_304s_make_no_request_at_all(start_service, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    etag = (await fetch(service.url(db, doc, "f.txt", TOKEN), "HEAD")).header("etag")
    seen = len(service.couchdb_targets())
    for _ in range(5):
        assert (await fetch(service.url(db, doc, "f.txt", "wrong"))).status == 403
        assert (await fetch(service.url(db, doc, "missing.txt", TOKEN))).status == 404
        reply = await fetch(service.url(db, doc, "f.txt", TOKEN), headers={"If-None-Match": etag})
        assert reply.status == 304
    assert len(service.couchdb_targets()) == seen


@pytest_twisted.ensureDeferred
async def test_negative_entries_spare_couchdb(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    admin.put(db, "tokenless", {"title": "no token here"})
    await warm(service, db)  # a download that passes: the database is followed
    for docid in ("nodoc", "tokenless"):
        await fetch(service.url(db, docid, "f.txt", "x"))
        before = len(service.couchdb_targets())
        for _ in range(20):
            assert (await fetch(service.url(db, docid, "f.txt", f"guess-{_}"))).status == 403
        assert len(service.couchdb_targets()) == before


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("cache_size", [10_000, 0], ids=["cache", "no-cache"])
async def test_concurrent_cold_requests_share_one_document_fetch(start_service, db, doc, cache_size):
    from tests.faultproxy import Fault

    service = await start_service(feed_heartbeat=HEARTBEAT, cache_size=cache_size)
    service.proxy.fault = Fault("delay", matches=lambda target: target == f"/{db}/doc", seconds=1.5)
    url = service.url(db, doc, "f.txt", TOKEN)
    replies = await DeferredList([ensureDeferred(fetch(url, "HEAD")) for _ in range(500)], consumeErrors=True)
    statuses = [result.status if ok else repr(result) for ok, result in replies]
    assert statuses == [200] * 500
    assert len(doc_requests(service, db)) == 1


@pytest_twisted.ensureDeferred
async def test_revocation_lands_within_a_second(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    admin.put(db, doc, {"download_token": "rotated"})
    took = await until_status(service.url(db, doc, "f.txt", TOKEN), 403)
    assert took is not None, "the old token still works after 1 s"
    assert (await fetch(service.url(db, doc, "f.txt", "rotated"))).status == 200


@pytest_twisted.ensureDeferred
async def test_deletion_lands_within_a_second(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    admin.delete(db, doc)
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403) is not None


@pytest_twisted.ensureDeferred
async def test_a_token_added_later_works_within_a_second(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)  # a download that passes: the database is followed
    admin.put(db, "later", {"title": "no token yet"})
    admin.put_attachment(db, "later", "f.txt", b"later")

    async def answered_from_the_cache() -> bool:
        # The attachment PUT's change may reach the feed just after a first check was stored
        # (CouchDB sends it a moment after the PUT returns): then the next check is fetched again.
        before = len(doc_requests(service, db, "later"))
        status = (await fetch(service.url(db, "later", "f.txt", "new"))).status
        assert status == 403
        return len(doc_requests(service, db, "later")) == before

    assert await wait_until(answered_from_the_cache, 5, interval=0.05), "a negative answer is cached"
    admin.put(db, "later", {"download_token": "new"})
    assert await until_status(service.url(db, "later", "f.txt", "new"), 200) is not None


@pytest_twisted.ensureDeferred
async def test_a_new_attachment_is_served_within_a_second(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    assert (await fetch(service.url(db, doc, "new.txt", TOKEN))).status == 404
    admin.put_attachment(db, doc, "new.txt", b"fresh")
    assert await until_status(service.url(db, doc, "new.txt", TOKEN), 200) is not None
    assert (await fetch(service.url(db, doc, "new.txt", TOKEN))).body == b"fresh"


@pytest_twisted.ensureDeferred
async def test_twenty_databases_each_revoked(start_service, admin):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    with databases(admin, "ct-many", 20) as names:
        for name in names:
            await warm(service, name)
        assert sum(f.live for f in service.app.feeds.feeds()) == 20
        for name in names:
            admin.put(name, "doc", {"download_token": f"new-{name}"})
        for name in names:
            assert await until_status(service.url(name, "doc", "f.txt", TOKEN), 403) is not None, name


@pytest_twisted.ensureDeferred
async def test_a_token_changed_during_an_outage_is_refused_on_the_first_answer(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    service.proxy.outage()
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 502
    admin.put(db, doc, {"download_token": "changed-while-down"})
    service.proxy.restore()
    first = await fetch(service.url(db, doc, "f.txt", TOKEN))
    assert first.status == 403
    assert (await fetch(service.url(db, doc, "f.txt", "changed-while-down"))).status == 200


@pytest_twisted.ensureDeferred
async def test_a_silent_feed_is_noticed_and_replaced(start_service, admin, db, doc):
    """The network keeps the connection but stops carrying bytes: the watchdog reconnects."""
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    (feed,) = service.app.feeds.feeds()
    epoch = feed.epoch
    service.proxy.silence("feed=continuous")
    admin.put(db, doc, {"download_token": "changed-while-silent"})
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403, timeout=5) is not None
    assert await wait_until(lambda: feed.live and feed.epoch > epoch, 5)
    assert feed.reconnects >= 1


@pytest_twisted.ensureDeferred
async def test_a_deleted_database_refuses_the_old_token_at_once(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    admin.delete_db(db)
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403) is not None
    admin.create_db(db)  # the fixture deletes it again


@pytest_twisted.ensureDeferred
async def test_a_missing_database_gets_no_feed(start_service):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    url = service.url("ct-never-created", "doc", "f.txt", TOKEN)
    for _ in range(10):
        assert (await fetch(url)).status == 403
    assert service.app.feeds.feeds() == []
    assert [t for t in service.couchdb_targets(feeds=True) if "_changes" in t] == []


@pytest_twisted.ensureDeferred
async def test_past_max_feeds_the_least_recently_used_database_goes_uncached(start_service, admin):
    service = await start_service(feed_heartbeat=HEARTBEAT, max_feeds=2)
    with databases(admin, "ct-lru", 3) as names:
        await warm(service, names[0])
        await warm(service, names[1])
        await warm(service, names[2])
        assert sorted(f.db for f in service.app.feeds.feeds()) == sorted(names[1:])
        before = len(doc_requests(service, names[0]))
        await fetch(service.url(names[0], "doc", "f.txt", TOKEN), "HEAD")
        assert len(doc_requests(service, names[0])) == before + 1
        assert len(service.app.feeds.feeds()) <= 2


@pytest_twisted.ensureDeferred
async def test_feeds_reconnect_after_couchdb_restarts(start_service, couch_server, admin, db, doc):
    if not couch_server.restartable:
        pytest.skip("restarts only a server the tests started")
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    couch_server.restart()
    assert await wait_until(lambda: all(f.fresh() for f in service.app.feeds.feeds()), 10)
    await warm(service, db)
    admin.put(db, doc, {"download_token": "after-restart"})
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403) is not None


@pytest_twisted.ensureDeferred
async def test_feeds_stop_with_the_service(start_service, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    feed_connections = service.proxy.connections_for("feed=continuous")
    assert any(c.open for c in feed_connections)
    await service.app.service.stopService()
    assert await wait_until(lambda: not any(c.open for c in feed_connections), 2)
    service.app.service.startService()  # the fixture stops it again


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("writes", ["fewer", "as-many", "more"])
async def test_a_database_deleted_and_created_again_is_followed_anew(start_service, admin, db, doc, writes):
    """PouchDB Server keeps heartbeating the feed of a deleted database: that feed must not vouch on.

    The new database's latest seq ends lower than, equal to, or above the old one's.
    Default heartbeat: a revoked token must stop opening within 3 s.
    """
    service = await start_service()
    await warm(service, db)
    old = await fetch(service.url(db, doc, "f.txt", TOKEN))
    assert (old.status, old.body) == (200, b"cached body")  # the blob cache holds the old bytes now
    admin.delete_db(db)
    admin.create_db(db)
    admin.put(db, doc, {"download_token": "second"})
    if writes != "fewer":
        admin.put_attachment(db, doc, "f.txt", b"second body", "text/plain")
    if writes == "more":
        for i in range(3):
            admin.put(db, f"other-{i}", {})
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403, timeout=3) is not None, (
        "the deleted database's token still opens"
    )
    if writes == "fewer":
        admin.put_attachment(db, doc, "f.txt", b"second body", "text/plain")
    assert await until_status(service.url(db, doc, "f.txt", "second"), 200, timeout=3) is not None
    assert (await fetch(service.url(db, doc, "f.txt", "second"))).body == b"second body"
    await warm(service, db, token="second")  # the new database is followed and cached
    admin.put(db, doc, {"download_token": "third"})
    assert await until_status(service.url(db, doc, "f.txt", "second"), 403, timeout=3) is not None, (
        "a token revoked in the new database still opens"
    )


@pytest_twisted.ensureDeferred
async def test_random_names_neither_start_feeds_nor_push_out_those_serving_hits(start_service, admin):
    service = await start_service(feed_heartbeat=HEARTBEAT, max_feeds=2)
    with databases(admin, "ct-busy", 2) as names:
        for name in names:
            await warm(service, name)
        feeds_before = len([t for t in service.couchdb_targets(feeds=True) if "feed=continuous" in t])
        burst = [fetch(service.url(f"ct-random-{i}", "doc", "f.txt", TOKEN)) for i in range(40)]
        burst += [fetch(service.url(names[0], f"random-{i}", "f.txt", TOKEN)) for i in range(20)]
        burst += [fetch(service.url(names[1], "doc", "f.txt", f"wrong-{i}")) for i in range(20)]
        replies = await DeferredList([ensureDeferred(d) for d in burst], consumeErrors=True)
        assert all(ok and reply.status == 403 for ok, reply in replies)
        assert sorted(f.db for f in service.app.feeds.feeds()) == sorted(names)
        feeds_after = len([t for t in service.couchdb_targets(feeds=True) if "feed=continuous" in t])
        assert feeds_after == feeds_before, "the burst cost CouchDB feed requests"
        for name in names:
            before = len(doc_requests(service, name))
            assert (await fetch(service.url(name, "doc", "f.txt", TOKEN), "HEAD")).status == 200
            assert len(doc_requests(service, name)) == before, f"{name} is no longer cached"


@pytest_twisted.ensureDeferred
async def test_without_db_updates_each_database_gets_a_feed_of_its_own(
    start_service, couch_server, db, doc, logged
):
    """PouchDB Server (and a CouchDB without _global_changes, like the suite's) has no /_db_updates."""
    if couch_server.kind == "url":
        pytest.skip("a CouchDB of someone else's may have _global_changes")
    service = await start_service(feed_heartbeat=HEARTBEAT)
    assert await wait_until(lambda: service.app.feeds.mode == "per-database", 5)
    await warm(service, db)
    assert [f.db for f in service.app.feeds.feeds()] == [db]
    said = [e for e in logged if "no /_db_updates" in e.get("log_format", "")]
    assert len(said) == 1
    assert service.app.feeds.details()["mode"] == "per-database"
