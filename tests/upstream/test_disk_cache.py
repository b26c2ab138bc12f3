"""The disk cache for large attachments, end to end: bytes, freshness, faults, restarts."""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import os
import shutil
import subprocess
import time
import urllib.request
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.web.client import ResponseFailed

from couchtoken.upstream import diskcache
from couchtoken.upstream.diskfiles import DATA, MARKER_NAME, MAX_HEADER, TMP, Header, file_name
from tests.faultproxy import Fault
from tests.http import fetch as http_fetch
from tests.http import start_download
from tests.ops.test_operations import metric
from tests.twistproc import TwistProcess, rss_bytes
from tests.upstream.test_cache import HEARTBEAT, attachment_requests, until_status, warm
from tests.waiting import wait_until

TOKEN = "t0ken"
MIB = 1024 * 1024


def listing(directory, part):
    path = os.path.join(directory, part)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def seed(admin, db, name="movie.bin", data=None, content_type="application/octet-stream", token=TOKEN):
    data = os.urandom(3 * MIB + 123) if data is None else data
    if admin.get(db, "doc") is None:
        admin.put(db, "doc", {"download_token": token})
    admin.put_attachment(db, "doc", name, data, content_type)
    return data


def couchdb_body(admin, db, name, headers=None):
    """The attachment as CouchDB itself serves it (admin credentials)."""
    status, _, body = admin.request("GET", f"{admin.doc_path(db, 'doc')}/{quote(name)}", headers=headers)
    assert status in (200, 206)
    return body


def key_of(admin, db, name):
    digest = admin.get(db, "doc")["_attachments"][name]["digest"]
    return (db, "doc", name, digest)


def etag_of(body):
    return '"' + base64.b64encode(hashlib.md5(body).digest()).decode() + '"'


_disks = []  # the disk caches of the services this test started


@pytest.fixture(autouse=True)
def _forget_disks():
    yield
    _disks.clear()


async def fetch(url, *args, **kwargs):
    """``tests.http.fetch``, then wait for the fills it started: they are checked after the reply."""
    reply = await http_fetch(url, *args, **kwargs)
    assert await wait_until(lambda: all(disk.filling == 0 for disk in _disks), 10), "a fill never ended"
    return reply


async def disk_service(start, directory, **options):
    """A service with the disk cache in ``directory``, its start-up checks done."""
    options.setdefault("feed_heartbeat", HEARTBEAT)
    service = await start(disk_cache_dir=str(directory), **options)
    disk = service.app.disk
    _disks.append(disk)
    assert await wait_until(lambda: disk.enabled and disk.pending_checks == 0, 10), "take-over never ended"
    return service


async def warm_disk_service(start, directory, db, attachment="movie.bin", **options):
    """``disk_service`` with ``db`` followed and its ``doc`` cached: (the service, ``attachment``'s URL)."""
    service = await disk_service(start, directory, **options)
    await warm(service, db, attachment=attachment)
    return service, service.url(db, "doc", attachment, TOKEN)


@pytest_twisted.ensureDeferred
async def test_hot_large_files_come_from_disk_byte_for_byte(start_service, admin, db, tmp_path):
    data = seed(admin, db, "movie.bin", content_type="video/mp4")
    assert couchdb_body(admin, db, "movie.bin") == data
    service, url = await warm_disk_service(start_service, tmp_path / "cache", db)
    disk = service.app.disk
    first = await fetch(url)  # relayed from CouchDB, and written to disk on the way
    assert (first.status, first.body) == (200, data)
    assert (disk.fills, listing(tmp_path / "cache", TMP)) == (1, [])
    assert listing(tmp_path / "cache", DATA) == [file_name(key_of(admin, db, "movie.bin"))]
    before = len(attachment_requests(service, db))
    again = await fetch(url)
    assert (again.status, again.body) == (200, data)
    for header in (
        "content-type",
        "content-length",
        "etag",
        "accept-ranges",
        "cache-control",
        "vary",
        "content-disposition",
        "x-content-type-options",
        "access-control-expose-headers",
    ):
        assert again.header(header) == first.header(header), header
    length = len(data)
    for asked, (start, stop) in (
        ("bytes=0-0", (0, 1)),
        ("bytes=1000-2000000", (1000, 2000001)),
        ("bytes=-500", (length - 500, length)),
        (f"bytes={length - 70000}-", (length - 70000, length)),
        (f"bytes=5-{length + 100}", (5, length)),
    ):
        ranged = await fetch(url, headers={"Range": asked})
        assert (ranged.status, ranged.body) == (206, data[start:stop]), asked
        assert ranged.header("content-range") == f"bytes {start}-{stop - 1}/{length}"
        assert ranged.header("content-length") == str(stop - start)
    head = await fetch(url, "HEAD")
    assert (head.status, head.header("content-length"), head.body) == (200, str(length), b"")
    unchanged = await fetch(url, headers={"If-None-Match": first.header("etag")})
    assert (unchanged.status, unchanged.body) == (304, b"")
    assert (await fetch(url, headers={"Range": f"bytes={length}-"})).status == 416
    assert len(attachment_requests(service, db)) == before  # nothing but the feed reached CouchDB
    assert disk.hits == 6
    text = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
    for name, value in (
        ("couchtoken_disk_cache_hits_total", 6),
        ("couchtoken_disk_cache_fills_total", 1),
        ("couchtoken_disk_cache_bytes", disk.bytes_held),
        ("couchtoken_disk_cache_misses_total", disk.misses),
        ("couchtoken_disk_cache_fill_failures_total", 0),
        ("couchtoken_disk_cache_evictions_total", 0),
        ("couchtoken_disk_cache_fallbacks_total", 0),
    ):
        assert metric(text, name) == value, name
    assert disk.bytes_held > length


@pytest_twisted.ensureDeferred
async def test_a_changed_attachment_is_served_new_at_once(start_service, admin, db, tmp_path):
    old = seed(admin, db, data=os.urandom(MIB))
    service, url = await warm_disk_service(start_service, tmp_path / "cache", db)
    await fetch(url)
    assert (await fetch(url)).body == old
    assert service.app.disk.hits == 1
    new = os.urandom(MIB)  # the same length: only the digest tells them apart
    admin.put_attachment(db, "doc", "movie.bin", new, "application/octet-stream")
    started = time.monotonic()
    while True:
        reply = await fetch(url)
        assert reply.body in (old, new)  # never a mix, never anything else
        assert reply.header("etag") == etag_of(reply.body)  # the bytes always match the digest named
        if reply.body == new:
            break
        assert time.monotonic() - started < 1.0, "the old bytes are still served after 1 s"
    for _ in range(3):
        reply = await fetch(url)
        assert (reply.body, reply.header("etag")) == (new, etag_of(new))
    assert service.app.disk.fills == 2  # the new content is a new file


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_gets_403_for_a_cached_file(start_service, admin, db, tmp_path):
    data = seed(admin, db)
    service, url = await warm_disk_service(start_service, tmp_path / "cache", db)
    await fetch(url)
    assert (await fetch(url)).body == data  # from disk
    document = admin.get(db, "doc")
    admin.put(db, "doc", {**document, "download_token": "rotated"})
    assert await until_status(url, 403, 1.0) is not None, "the old token still opens the cached file"
    assert (await fetch(url)).status == 403
    hits = service.app.disk.hits
    assert (await fetch(service.url(db, "doc", "movie.bin", "rotated"))).body == data
    assert service.app.disk.hits == hits + 1  # the file itself was still good


@pytest_twisted.ensureDeferred
async def test_a_cut_first_download_leaves_no_file_and_the_next_one_fills(start_service, admin, db, tmp_path):
    data = seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    disk = service.app.disk
    # CouchDB's connection breaks mid-body.
    service.proxy.fault = Fault("cut", matches=lambda target: "movie.bin" in target, after=MIB)
    with pytest.raises(Exception):  # noqa: B017 - the client sees a broken body, whatever its class
        await fetch(url)
    assert await wait_until(lambda: disk.fill_failures == 1, 5)
    assert (listing(cache, DATA), listing(cache, TMP), disk.fills) == ([], [], 0)
    service.proxy.fault = None
    # The client goes away mid-body.
    port = int(service.base_url.rsplit(":", 1)[1])
    sock = await threads.deferToThread(start_download, port, f"/{db}/doc/movie.bin?token={TOKEN}")
    await threads.deferToThread(sock.recv, 65536)
    sock.close()
    assert await wait_until(lambda: disk.fill_failures == 2, 5)
    assert (listing(cache, DATA), listing(cache, TMP), disk.fills) == ([], [], 0)
    # The next whole download fills.
    assert (await fetch(url)).body == data
    assert (len(listing(cache, DATA)), listing(cache, TMP), disk.fills) == (1, [], 1)
    before = len(attachment_requests(service, db))
    assert (await fetch(url)).body == data
    assert len(attachment_requests(service, db)) == before


@pytest_twisted.ensureDeferred
async def test_several_clients_of_a_cold_file_share_one_fill(start_service, admin, db, tmp_path):
    data = seed(admin, db, data=os.urandom(MIB))
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    # Slow CouchDB down so that the four downloads overlap.
    service.proxy.fault = Fault("throttle", matches=lambda target: "movie.bin" in target, rate=4 * MIB)
    replies = await DeferredList([ensureDeferred(fetch(url)) for _ in range(4)], consumeErrors=True)
    assert all(ok and reply.body == data for ok, reply in replies)
    disk = service.app.disk
    assert (disk.fills, disk.fill_failures, len(listing(cache, DATA)), listing(cache, TMP)) == (1, 0, 1, [])


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("damage", ["truncated", "grown", "emptied"])
async def test_a_file_of_the_wrong_size_is_refetched_never_served(start_service, admin, db, tmp_path, damage):
    data = seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    disk = service.app.disk
    await fetch(url)
    (name,) = listing(cache, DATA)
    path = os.path.join(cache, DATA, name)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        if damage == "grown":
            handle.seek(0, os.SEEK_END)
            handle.write(b"x" * 10)
        else:
            handle.truncate(size - 1000 if damage == "truncated" else 0)
    before = len(attachment_requests(service, db))
    assert (await fetch(url)).body == data
    assert len(attachment_requests(service, db)) == before + 1  # came from CouchDB...
    assert (disk.fallbacks, disk.fills, os.path.getsize(path)) == (1, 2, size)  # ...and filled again
    assert (await fetch(url)).body == data
    assert len(attachment_requests(service, db)) == before + 1


class FakeFailingReads:
    """A named fake for a disk that fails under a file being served: ``os.pread`` on the cache file
    fails (``EIO``) or comes back empty (the file cut short) after ``good`` chunks."""

    def __init__(self, monkeypatch, directory, how, good=3):
        self._real = os.pread
        self._directory = os.path.realpath(directory)
        self._how = how
        self._good = good
        monkeypatch.setattr(os, "pread", self)

    def __call__(self, fd, count, offset):
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(self._directory):
            return self._real(fd, count, offset)
        if self._good:
            self._good -= 1
            return self._real(fd, count, offset)
        if self._how == "error":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return b""


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["error", "short"])
async def test_a_read_failure_mid_file_is_finished_from_couchdb(
    start_service, admin, db, tmp_path, monkeypatch, how
):
    data = seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    disk = service.app.disk
    await fetch(url)
    FakeFailingReads(monkeypatch, cache, how)
    before = len(attachment_requests(service, db))
    whole = await fetch(url)
    assert (whole.status, whole.body) == (200, data)
    assert (disk.hits, disk.fallbacks, listing(cache, DATA)) == (1, 1, [])  # the bad file is gone
    assert len(attachment_requests(service, db)) == before + 1
    await fetch(url)  # fills again
    FakeFailingReads(monkeypatch, cache, how, good=1)
    ranged = await fetch(url, headers={"Range": "bytes=100000-1999999"})
    assert (ranged.status, ranged.body) == (206, data[100000:2000000])
    assert disk.fallbacks == 2


@pytest_twisted.ensureDeferred
async def test_a_read_failure_that_couchdb_cannot_finish_breaks_the_response_off(
    start_service, admin, db, tmp_path, monkeypatch
):
    """The headers are sent: a body CouchDB cannot finish must not look complete."""
    seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    await fetch(url)
    FakeFailingReads(monkeypatch, cache, "error")
    service.proxy.fault = Fault("reset", matches=lambda target: "movie.bin" in target)
    with pytest.raises(ResponseFailed):
        await fetch(url)
    assert await wait_until(lambda: len(service.app.app.in_flight.active) == 0, 5)
    service.proxy.fault = None
    assert (await fetch(url)).status == 200


@pytest_twisted.ensureDeferred
async def test_a_missing_directory_falls_back_and_comes_back(start_service, admin, db, tmp_path):
    data = seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    disk = service.app.disk
    await fetch(url)
    shutil.rmtree(cache)
    assert (await fetch(url)).body == data  # from CouchDB, and filled into a new directory
    assert (disk.fallbacks, disk.fills, len(listing(cache, DATA))) == (1, 2, 1)
    assert os.path.exists(cache / MARKER_NAME)
    before = len(attachment_requests(service, db))
    assert (await fetch(url)).body == data
    assert len(attachment_requests(service, db)) == before


class FakeFullDisk:
    """A named fake for a small disk: files opened for writing by the disk cache refuse writes
    (``ENOSPC``) that would take the directory past ``capacity`` bytes, as a full file system does."""

    def __init__(self, monkeypatch, directory, capacity):
        self.directory = directory
        self.capacity = capacity
        monkeypatch.setattr(diskcache, "open", self.open, raising=False)

    def used(self):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(self.directory)
            for name in names
        )

    def open(self, path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)  # noqa: SIM115
        if "b" not in mode or not any(flag in mode for flag in "wxa+"):
            return real
        fake = self

        class _OnFullDisk:
            def write(self, data):
                real.flush()
                if fake.used() + len(data) > fake.capacity:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real.write(data)

            def __getattr__(self, name):
                return getattr(real, name)

        return _OnFullDisk()


@pytest.fixture(params=["tmpfs", "fake"])
def full_disk(request, tmp_path, monkeypatch):
    """A cache directory with 1 MiB of room: a real 1 MiB tmpfs (needs root), or ``FakeFullDisk``."""
    directory = tmp_path / "cache"
    directory.mkdir()
    if request.param == "fake":
        FakeFullDisk(monkeypatch, directory, capacity=MIB)
        yield directory
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_falls_back_to_couchdb(start_service, admin, db, full_disk):
    data = seed(admin, db, data=os.urandom(2 * MIB))
    fits = seed(admin, db, "fits.bin", os.urandom(600 * 1024))
    service, url = await warm_disk_service(start_service, full_disk, db)
    disk = service.app.disk
    for attempt in (1, 2):
        assert (await fetch(url)).body == data  # whole, though its fill failed
        assert (disk.fill_failures, disk.fallbacks, disk.fills) == (attempt, attempt, 0)
        assert (listing(full_disk, DATA), listing(full_disk, TMP)) == ([], [])  # nothing left behind
    # What still fits is cached.
    fits_url = service.url(db, "doc", "fits.bin", TOKEN)
    assert (await fetch(fits_url)).body == fits
    assert (await fetch(fits_url)).body == fits
    assert (disk.fills, disk.hits) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_the_cache(service_starter, admin, db, tmp_path):
    data = seed(admin, db)
    cache = tmp_path / "cache"
    first, url = await warm_disk_service(service_starter.start, cache, db)
    await fetch(url)
    await service_starter.stop(first)
    second = await disk_service(service_starter.start, cache)
    assert (len(second.app.disk), second.app.disk.bytes_held) == (1, first.app.disk.bytes_held)
    await warm(second, db, attachment="movie.bin")
    reply = await fetch(second.url(db, "doc", "movie.bin", TOKEN))
    assert (reply.status, reply.body) == (200, data)
    assert (second.app.disk.hits, attachment_requests(second, db)) == (1, [])


@pytest_twisted.ensureDeferred
async def test_files_taken_over_at_start_are_checked_against_their_digest(
    service_starter, admin, db, tmp_path
):
    good = seed(admin, db, "good.bin")
    bad = seed(admin, db, "bad.bin")
    cache = tmp_path / "cache"
    first = await disk_service(service_starter.start, cache)
    await warm(first, db, attachment="good.bin")
    for name in ("good.bin", "bad.bin"):
        await fetch(first.url(db, "doc", name, TOKEN))
    await service_starter.stop(first)
    with open(os.path.join(cache, DATA, file_name(key_of(admin, db, "bad.bin"))), "r+b") as handle:
        handle.seek(-10, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-10, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 1]))  # one bit flipped: the size is right, the bytes are not
    (cache / DATA / "notes.txt").write_text("not a cache file")
    (cache / DATA / ("0" * 64)).write_bytes(b"not a cache file either")
    (cache / TMP / "cut-by-a-crash").write_bytes(b"half a fill")
    second = await disk_service(service_starter.start, cache)
    assert listing(cache, DATA) == [file_name(key_of(admin, db, "good.bin"))]
    assert listing(cache, TMP) == []
    await warm(second, db, attachment="good.bin")
    assert (await fetch(second.url(db, "doc", "good.bin", TOKEN))).body == good
    assert attachment_requests(second, db) == []
    assert (await fetch(second.url(db, "doc", "bad.bin", TOKEN))).body == bad  # from CouchDB
    assert len(attachment_requests(second, db)) == 1
    assert second.app.disk.fills == 1  # and filled anew


@pytest_twisted.ensureDeferred
async def test_a_foreign_directory_is_left_alone_and_the_disk_cache_is_off(
    start_service, admin, db, tmp_path
):
    data = seed(admin, db)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    service = await start_service(feed_heartbeat=HEARTBEAT, disk_cache_dir=str(foreign))
    assert not service.app.disk.enabled
    await warm(service, db, attachment="movie.bin")
    for _ in range(2):
        assert (await fetch(service.url(db, "doc", "movie.bin", TOKEN))).body == data
    assert sorted(os.listdir(foreign)) == ["thesis.tex"]


@pytest_twisted.ensureDeferred
async def test_a_database_deleted_during_a_gap_drops_its_files(start_service, admin, db, tmp_path):
    seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    await fetch(url)
    assert len(listing(cache, DATA)) == 1
    service.proxy.outage()
    admin.delete_db(db)
    service.proxy.restore()
    assert (await fetch(url)).status == 403  # the first answer after the gap
    assert await wait_until(lambda: listing(cache, DATA) == [], 10), "the deleted database's file stays"
    assert (service.app.disk.bytes_held, service.app.disk.evictions) == (0, 1)
    admin.create_db(db)
    data = seed(admin, db)  # the same names, other bytes
    for _ in range(2):
        assert (await fetch(url)).body == data


@pytest_twisted.ensureDeferred
async def test_a_database_deleted_under_a_live_feed_refuses_its_cached_files(
    start_service, admin, db, tmp_path
):
    """On both servers: CouchDB ends the feed; on PouchDB Server the feed's database check notices."""
    data = seed(admin, db)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db)
    assert (await fetch(url)).body == data
    await deleting_drops_the_files(admin, db, url, cache, within=10)


async def deleting_drops_the_files(admin, db, url, cache, within):
    """Delete ``db``: its cached file must be refused within 2 s and gone from disk within ``within``."""
    admin.delete_db(db)
    try:
        assert await until_status(url, 403, 2.0) is not None, "a deleted database's file is still served"
        assert await wait_until(lambda: listing(cache, DATA) == [], within), (
            "the deleted database's file stays"
        )
    finally:
        admin.create_db(db)  # the fixture deletes it


@pytest_twisted.ensureDeferred
async def test_a_compressible_attachment_is_kept_as_its_identity_bytes(start_service, admin, db, tmp_path):
    """CouchDB stores text gzip-compressed and digests the compressed bytes: the length is checked."""
    data = seed(admin, db, "log.txt", os.urandom(MIB).hex().encode(), "text/plain")
    stubs = admin.json("GET", admin.doc_path(db, "doc") + "?att_encoding_info=true")["_attachments"]
    compressed = stubs["log.txt"].get("encoding") == "gzip"  # a plain GET does not say (CouchDB does it)
    cache = tmp_path / "cache"
    service, url = await warm_disk_service(start_service, cache, db, "log.txt")
    disk = service.app.disk
    gzipped = await fetch(url, headers={"Accept-Encoding": "gzip"})
    if compressed:  # passed through as CouchDB sent it, and not kept: the file holds identity bytes
        assert gzipped.header("content-encoding") == "gzip"
        assert gzip.decompress(gzipped.body) == data
        assert disk.fills == 0
    assert (await fetch(url)).body == data
    assert disk.fills == 1
    (name,) = listing(cache, DATA)
    with open(os.path.join(cache, DATA, name), "rb") as handle:
        header, _ = Header.decode(handle.read(MAX_HEADER))
    assert header.identity is not compressed
    before = len(attachment_requests(service, db))
    for headers in ({}, {"Accept-Encoding": "gzip"}):
        reply = await fetch(url, headers=headers)
        assert (reply.body, reply.header("content-encoding")) == (data, None)
    assert len(attachment_requests(service, db)) == before


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_a_cached_file_is_cut(start_service, admin, db, tmp_path):
    seed(admin, db, data=os.urandom(16 * MIB))
    service, url = await warm_disk_service(start_service, tmp_path / "cache", db, idle_timeout=1.0)
    await fetch(url)
    port = int(service.base_url.rsplit(":", 1)[1])
    stuck = await threads.deferToThread(start_download, port, f"/{db}/doc/movie.bin?token={TOKEN}")
    try:
        assert await wait_until(lambda: service.app.disk.hits == 1, 5)
        started = time.monotonic()
        assert await wait_until(lambda: len(service.app.app.in_flight.active) == 0, 6)
        assert 0.9 < time.monotonic() - started
        text = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
        assert metric(text, "couchtoken_idle_disconnects_total") == 1
    finally:
        stuck.close()


@pytest.mark.slow
def test_twenty_slow_clients_of_a_cached_file_keep_memory_flat(couch_server, admin, db, tmp_path, capsys):
    seed(admin, db, data=os.urandom(16 * MIB))
    service = TwistProcess(
        tmp_path / "twist.log",
        ["--disk-cache-dir", str(tmp_path / "cache"), "--public-metrics"],
        env={"COUCHDB_URL": couch_server.url},
    )
    service.start()
    path = f"/{db}/doc/movie.bin?token={TOKEN}"
    try:
        with urllib.request.urlopen(service.base_url + path, timeout=30) as response:
            assert len(response.read()) == 16 * MIB  # fills the cache

        def filled():
            with urllib.request.urlopen(service.base_url + "/_metrics", timeout=30) as response:
                return metric(response.read().decode(), "couchtoken_disk_cache_fills_total") == 1

        deadline = time.monotonic() + 10
        while not filled():  # the fill is checked and renamed just after the reply
            assert time.monotonic() < deadline, "the file was never filled"
            time.sleep(0.1)
        before = rss_bytes(service.process.pid)
        readers = [start_download(service.port, path) for _ in range(20)]
        read = 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            for sock in readers:
                read += len(sock.recv(5_000))  # 20 clients at about 100 kB/s each
            time.sleep(0.05)
        after = rss_bytes(service.process.pid)
        for sock in readers:
            sock.close()
        with urllib.request.urlopen(service.base_url + "/_metrics", timeout=30) as response:
            assert metric(response.read().decode(), "couchtoken_disk_cache_hits_total") == 20
    finally:
        service.stop()
    growth = after - before
    with capsys.disabled():
        print(
            f"\n[memory] 20 slow clients read {read / 1e6:.1f} MB of a cached 16 MiB file in 6 s; "
            f"service RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB (growth {growth / 2**20:.2f} MiB)"
        )
    assert read > 20 * 300_000
    assert growth < 32 * 2**20


@pytest_twisted.ensureDeferred
async def test_a_range_for_the_whole_file_fills_and_smaller_ones_do_not(start_service, admin, db, tmp_path):
    """A video player's first request is ``Range: bytes=0-``."""
    data = seed(admin, db, content_type="video/mp4")
    service, url = await warm_disk_service(start_service, tmp_path / "cache", db)
    disk = service.app.disk
    part = await fetch(url, headers={"Range": "bytes=0-999"})
    assert (part.status, part.body, disk.fills) == (206, data[:1000], 0)
    whole = await fetch(url, headers={"Range": "bytes=0-"})
    assert (whole.status, whole.body, disk.fills) == (206, data, 1)
    before = len(attachment_requests(service, db))
    again = await fetch(url, headers={"Range": "bytes=0-"})
    assert (again.status, again.body, again.header("content-range")) == (
        206,
        data,
        f"bytes 0-{len(data) - 1}/{len(data)}",
    )
    assert len(attachment_requests(service, db)) == before
