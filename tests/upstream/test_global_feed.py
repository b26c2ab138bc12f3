"""The global feed (``/_db_updates``) on real CouchDB: databases without a feed of their own stay cached.

The suite's CouchDB has no ``_global_changes`` database (so the other tests run with
per-database feeds); this module creates it for its tests and deletes it afterwards.
PouchDB Server has no ``/_db_updates``: its fallback is tested in ``test_cache.py``.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.http import fetch
from tests.upstream.test_cache import HEARTBEAT, TOKEN, doc_requests, until_status
from tests.upstream.test_disk_cache import DATA, deleting_drops_the_files, disk_service, listing, seed
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def global_changes(couch_server, admin):
    if couch_server.kind == "pouchdb":
        pytest.skip("PouchDB Server has no /_db_updates")
    status, _, _ = admin.request("GET", "/_global_changes")
    created = status == 404
    if created:
        admin.create_db("_global_changes")
    yield
    if created:
        admin.delete_db("_global_changes")


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", b"cached body", "text/plain")
    return "doc"


async def settled() -> None:
    """Let the _db_updates events of what the fixtures just wrote arrive (CouchDB batches them, ~1 s).

    A late "created" event drops the database's coverage, which is safe but would make
    a test's revocation land by that instead of by the catch-up read it means to test.
    """
    await deferLater(reactor, 1.5, lambda: None)


@pytest_twisted.async_fixture
async def service(global_changes, start_service, doc):
    """Under the global feed alone (--max-feeds 0: no database gets a feed of its own, however hot)."""
    service = await start_service(feed_heartbeat=HEARTBEAT, max_feeds=0)
    assert await wait_until(lambda: service.app.feeds.mode == "global", 5), "the global feed never went live"
    await settled()
    return service


async def cached(service, db, docid="doc", token=TOKEN, timeout=5.0):
    """Download until the check is answered from memory; False if it never is within ``timeout``."""
    url = service.url(db, docid, "f.txt", token)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        assert (await fetch(url, "HEAD")).status == 200
        before = len(doc_requests(service, db, docid))
        await fetch(url, "HEAD")
        if len(doc_requests(service, db, docid)) == before:
            return True
    return False


@pytest_twisted.ensureDeferred
async def test_a_database_without_a_feed_of_its_own_is_cached_under_the_global_feed(service, db, doc):
    assert await cached(service, db)
    assert service.app.feeds.feeds() == [], "a cold database gets no feed of its own"
    feeds = [t for t in service.couchdb_targets(feeds=True) if "_changes?feed=continuous" in t]
    assert feeds == []
    before = len(service.couchdb_targets())
    for _ in range(5):
        assert (await fetch(service.url(db, doc, "f.txt", "wrong"))).status == 403
        assert (await fetch(service.url(db, doc, "f.txt", TOKEN), "HEAD")).status == 200
    assert len(service.couchdb_targets()) == before, "warm checks cost CouchDB nothing"


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_in_a_feedless_database_stops_within_2_s(service, admin, db, doc):
    admin.put(db, "other", {"download_token": TOKEN})
    admin.put_attachment(db, "other", "f.txt", b"other body", "text/plain")
    assert await cached(service, db)
    assert await cached(service, db, "other")
    written = time.monotonic()
    admin.put(db, doc, {"download_token": "rotated"})
    took = await until_status(service.url(db, doc, "f.txt", TOKEN), 403, timeout=2.5)
    assert took is not None and time.monotonic() - written < 2.0, "the revoked token still opens after 2 s"
    assert any("/_changes?since=" in t for t in service.couchdb_targets(feeds=True)), "no catch-up read"
    assert (await fetch(service.url(db, doc, "f.txt", "rotated"))).status == 200
    before = len(doc_requests(service, db, "other"))
    assert (await fetch(service.url(db, "other", "f.txt", TOKEN), "HEAD")).status == 200
    assert len(doc_requests(service, db, "other")) == before, "an unchanged document stays cached"


@pytest_twisted.ensureDeferred
async def test_a_database_deleted_and_created_again_under_the_global_feed(service, admin, db, doc):
    assert await cached(service, db)
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).body == b"cached body"
    assert service.app.blobs.bytes_held > 0
    admin.delete_db(db)
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403, timeout=2) is not None
    assert await wait_until(lambda: service.app.blobs.bytes_held == 0, 2), "the deleted bytes stay in memory"
    admin.create_db(db)
    admin.put(db, doc, {"download_token": "second"})
    admin.put_attachment(db, doc, "f.txt", b"second body", "text/plain")
    assert await until_status(service.url(db, doc, "f.txt", "second"), 200, timeout=2) is not None
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 403
    assert await cached(service, db, token="second")
    admin.put(db, doc, {"download_token": "third"})
    assert await until_status(service.url(db, doc, "f.txt", "second"), 403, timeout=2) is not None


@pytest_twisted.ensureDeferred
async def test_a_database_created_after_the_start_is_covered(service, admin):
    name = f"ct-new-{time.monotonic_ns() % 10**9}"
    admin.create_db(name)
    try:
        admin.put(name, "doc", {"download_token": TOKEN})
        admin.put_attachment(name, "doc", "f.txt", b"new", "text/plain")
        assert await cached(service, name)
        admin.delete(name, "doc")
        assert await until_status(service.url(name, "doc", "f.txt", TOKEN), 403, timeout=2) is not None
    finally:
        admin.delete_db(name)


@pytest_twisted.ensureDeferred
async def test_a_gap_in_the_global_feed_drops_every_entry_it_covers(service, admin, db, doc):
    assert await cached(service, db)
    global_feed = service.app.feeds.global_feed
    epoch = global_feed.epoch
    (connection,) = [c for c in service.proxy.connections_for("_db_updates") if c.open]
    connection.transport.abortConnection()
    assert await wait_until(lambda: not global_feed.live, 2)
    assert len(service.app.documents) == 0, "the gap left entries behind"
    admin.put(db, doc, {"download_token": "changed-in-the-gap"})
    assert (await fetch(service.url(db, doc, "f.txt", TOKEN))).status == 403  # the very first answer
    assert await wait_until(lambda: global_feed.live and global_feed.epoch > epoch, 5)
    assert await cached(service, db, token="changed-in-the-gap")


@pytest_twisted.ensureDeferred
async def test_a_silent_global_feed_stops_vouching_at_once(service, admin, db, doc):
    assert await cached(service, db)
    service.proxy.silence("_db_updates")
    admin.put(db, doc, {"download_token": "changed-while-silent"})
    assert await until_status(service.url(db, doc, "f.txt", TOKEN), 403, timeout=3) is not None


@pytest_twisted.ensureDeferred
async def test_a_hot_database_gets_a_feed_of_its_own(global_changes, start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    assert await wait_until(lambda: service.app.feeds.mode == "global", 5)
    await settled()
    for _ in range(15):  # more than one passed check a second
        assert (await fetch(service.url(db, doc, "f.txt", TOKEN), "HEAD")).status == 200
    assert [f.db for f in service.app.feeds.feeds()] == [db]
    assert await wait_until(lambda: service.app.feeds.feeds()[0].fresh(), 5)
    assert await cached(service, db)
    admin.put(db, doc, {"download_token": "rotated"})
    took = await until_status(service.url(db, doc, "f.txt", TOKEN), 403, timeout=1)
    assert took is not None, "the own feed did not revoke within 1 s"


@pytest_twisted.ensureDeferred
async def test_health_says_which_feeds_run(service, db, doc):
    assert await cached(service, db)
    body = (await fetch(f"{service.ops_url}/_health")).json()
    assert body["feeds"] == {"mode": "global", "connected": 1, "total": 1, "covered": 1}


@pytest_twisted.ensureDeferred
async def test_a_database_deleted_under_the_global_feed_drops_its_disk_files(
    global_changes, start_service, admin, db, tmp_path
):
    data = seed(admin, db, token=TOKEN)
    cache = tmp_path / "cache"
    service = await disk_service(start_service, cache, max_feeds=0)
    assert await wait_until(lambda: service.app.feeds.mode == "global", 5), "the global feed never went live"
    await settled()
    url = service.url(db, "doc", "movie.bin", TOKEN)
    assert (await fetch(url)).body == data
    assert await wait_until(lambda: len(listing(cache, DATA)) == 1, 10), "the file was never filled"
    await deleting_drops_the_files(admin, db, url, cache, within=5)
