"""The hot-attachment cache: small bodies from memory, never stale, bounded in bytes."""

from __future__ import annotations

import os
import time

import pytest_twisted

from couchtoken.upstream.blobs import BlobCache
from tests.http import fetch
from tests.upstream.test_cache import HEARTBEAT, attachment_requests, warm
from tests.waiting import wait_until

TOKEN = "t0ken"


def seed(admin, db, name="f.txt", data=b"hot body", content_type="text/plain"):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", name, data, content_type)


@pytest_twisted.ensureDeferred
async def test_small_bodies_come_from_memory_byte_for_byte(start_service, admin, db):
    data = os.urandom(100_000)
    seed(admin, db, "photo.jpg", data, "image/jpeg")
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db, attachment="photo.jpg")
    first = await fetch(service.url(db, "doc", "photo.jpg", TOKEN))  # streamed, and kept
    before = len(service.couchdb_targets())
    for _ in range(5):
        again = await fetch(service.url(db, "doc", "photo.jpg", TOKEN))
        assert (again.status, again.body) == (200, data)
        for header in ("content-type", "content-length", "etag", "accept-ranges", "cache-control"):
            assert again.header(header) == first.header(header), header
    ranged = await fetch(service.url(db, "doc", "photo.jpg", TOKEN), headers={"Range": "bytes=10-19"})
    assert (ranged.status, ranged.body) == (206, data[10:20])
    assert ranged.header("content-range") == f"bytes 10-19/{len(data)}"
    assert len(service.couchdb_targets()) == before  # no request reached CouchDB
    assert service.app.blobs.hits == 6


@pytest_twisted.ensureDeferred
async def test_an_updated_attachment_is_served_new_within_a_second(start_service, admin, db):
    seed(admin, db, data=b"version one")
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    await fetch(service.url(db, "doc", "f.txt", TOKEN))
    assert (await fetch(service.url(db, "doc", "f.txt", TOKEN))).body == b"version one"
    admin.put_attachment(db, "doc", "f.txt", b"version two", "text/plain")
    url = service.url(db, "doc", "f.txt", TOKEN)
    started = time.monotonic()
    while (reply := await fetch(url)).body != b"version two":
        assert reply.body == b"version one"  # never a mix, never anything else
        assert time.monotonic() - started < 1.0, "the old bytes are still served after 1 s"
    for _ in range(3):
        assert (await fetch(url)).body == b"version two"


@pytest_twisted.ensureDeferred
async def test_a_deleted_databases_bodies_leave_memory(start_service, admin, db):
    seed(admin, db)
    service = await start_service(feed_heartbeat=HEARTBEAT)
    await warm(service, db)
    await fetch(service.url(db, "doc", "f.txt", TOKEN))
    assert service.app.blobs.bytes_held == len(b"hot body")
    admin.delete_db(db)
    assert await wait_until(lambda: service.app.blobs.bytes_held == 0, 3), "the bytes outlive their database"
    admin.create_db(db)  # the fixture deletes it again


@pytest_twisted.ensureDeferred
async def test_large_bodies_and_ranged_first_reads_are_not_kept(start_service, admin, db):
    seed(admin, db, "big.bin", os.urandom(300_000), "application/octet-stream")
    admin.put_attachment(db, "doc", "small.bin", b"s" * 1000, "application/octet-stream")
    service = await start_service(feed_heartbeat=HEARTBEAT, blob_cache_max_item=256 * 1024)
    await warm(service, db, attachment="big.bin")
    for _ in range(2):
        await fetch(service.url(db, "doc", "big.bin", TOKEN))
    await fetch(service.url(db, "doc", "small.bin", TOKEN), headers={"Range": "bytes=0-9"})
    assert service.app.blobs.bytes_held == 0
    assert len(attachment_requests(service, db)) == 3


@pytest_twisted.ensureDeferred
async def test_zero_bytes_turns_the_blob_cache_off(start_service, admin, db):
    seed(admin, db)
    service = await start_service(feed_heartbeat=HEARTBEAT, blob_cache_bytes=0)
    await warm(service, db)
    for _ in range(3):
        assert (await fetch(service.url(db, "doc", "f.txt", TOKEN))).body == b"hot body"
    assert len(attachment_requests(service, db)) == 3
    assert service.app.blobs.bytes_held == 0


def test_the_byte_bound_holds_under_churn():
    blobs = BlobCache(max_bytes=10_000, max_item=3_000)
    for i in range(2_000):
        blobs.put(("db", "doc", f"a{i % 97}", f"md5-{i}"), os.urandom(1 + (i * 37) % 3_000))
        assert blobs.bytes_held <= 10_000
    blobs.put(("db", "doc", "huge", "md5-x"), b"x" * 3_001)
    assert blobs.get(("db", "doc", "huge", "md5-x")) is None


def test_a_new_digest_is_a_new_key():
    blobs = BlobCache(max_bytes=10_000, max_item=3_000)
    blobs.put(("db", "doc", "a", "md5-old"), b"old")
    assert blobs.get(("db", "doc", "a", "md5-new")) is None
    assert blobs.get(("db", "doc", "a", "md5-old")) == b"old"


def test_dropping_a_database_keeps_the_others():
    blobs = BlobCache(max_bytes=10_000, max_item=3_000)
    blobs.put(("gone", "doc", "a", "md5-1"), b"one")
    blobs.put(("kept", "doc", "a", "md5-1"), b"two")
    blobs.drop_database("gone")
    assert blobs.get(("gone", "doc", "a", "md5-1")) is None
    assert blobs.get(("kept", "doc", "a", "md5-1")) == b"two"
    assert blobs.bytes_held == 3
