"""The disk cache's own rules, on real files: bounds, fills, take-over (no service, no reactor)."""

from __future__ import annotations

import base64
import hashlib
import os
import threading

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred

from couchtoken.access.attachments import AttachmentInfo
from couchtoken.upstream.diskcache import NICE, DiskCache, directory_problem, disk_threads
from couchtoken.upstream.diskfiles import DATA, MARKER_NAME, TMP, file_name
from couchtoken.upstream.diskfill import MAX_LAG

MIB = 1024 * 1024


def in_this_thread(function, *args):
    return maybeDeferred(function, *args)


def make_cache(directory, max_bytes=100_000, max_item=50_000):
    cache = DiskCache(str(directory), max_bytes, max_item, run_in_thread=in_this_thread)
    cache.take_over()
    assert cache.enabled and cache.pending_checks == 0
    return cache


def digest_of(body):
    return "md5-" + base64.b64encode(hashlib.md5(body).digest()).decode()


def fill(cache, name, body, *, stored_compressed=False, digest=None, length=None, db="db"):
    key = (db, "doc", name, digest or digest_of(body))
    info = AttachmentInfo(b"application/octet-stream", len(body) if length is None else length, key[3])
    writing = cache.start_fill(key, info, stored_compressed=stored_compressed)
    assert writing is not None
    for start in range(0, len(body), 4096):
        writing.append(body[start : start + 4096])
    writing.commit()
    return key


def read(cache, key, length):
    opened = cache.open(key, length)
    if opened is None:
        return None
    try:
        return os.pread(opened.fd, opened.length, opened.offset)
    finally:
        os.close(opened.fd)


def test_files_round_trip_and_their_names_say_nothing(tmp_path):
    cache = make_cache(tmp_path)
    body = os.urandom(30_000)
    key = fill(cache, "secret plans.pdf", body)
    assert read(cache, key, len(body)) == body
    assert os.listdir(tmp_path / DATA) == [file_name(key)]
    assert "secret" not in file_name(key)
    assert (cache.fills, cache.hits, os.listdir(tmp_path / TMP)) == (1, 1, [])


def test_the_byte_bound_holds_and_least_recently_used_files_go_first(tmp_path):
    cache = make_cache(tmp_path, max_bytes=100_000, max_item=30_000)
    keys = [fill(cache, f"f{i}", os.urandom(20_000 + i)) for i in range(4)]
    assert read(cache, keys[0], 20_000) is not None  # f0 is now the most recently used
    fill(cache, "f4", os.urandom(25_000))
    assert cache.bytes_held <= 100_000
    assert read(cache, keys[1], 20_001) is None  # the least recently used went first
    assert read(cache, keys[0], 20_000) is not None
    for i in range(200):
        fill(cache, f"churn{i % 13}-{i}", os.urandom(1 + (i * 7919) % 30_000))
        assert cache.bytes_held <= 100_000
        assert sum(os.path.getsize(tmp_path / DATA / name) for name in os.listdir(tmp_path / DATA)) <= 100_000
    assert cache.evictions > 0


def test_room_is_made_before_a_fill_starts(tmp_path):
    cache = make_cache(tmp_path, max_bytes=100_000, max_item=60_000)
    fill(cache, "old", os.urandom(45_000))
    fill(cache, "older", os.urandom(45_000))
    body = os.urandom(50_000)
    key = ("db", "doc", "new", digest_of(body))
    writing = cache.start_fill(key, AttachmentInfo(b"x/y", len(body), key[3]), stored_compressed=False)
    assert writing is not None
    on_disk = sum(os.path.getsize(os.path.join(root, n)) for root, _, ns in os.walk(tmp_path) for n in ns)
    assert on_disk - os.path.getsize(tmp_path / MARKER_NAME) <= 100_000 - 50_000
    writing.append(body)
    writing.commit()
    assert read(cache, key, len(body)) == body


def test_a_bad_fill_leaves_nothing(tmp_path):
    cache = make_cache(tmp_path)
    body = os.urandom(10_000)
    fill(cache, "short", body[:-1], digest=digest_of(body), length=len(body))  # cut before the end
    fill(cache, "long", body + b"x", digest=digest_of(body), length=len(body))  # more than announced
    fill(cache, "other bytes", os.urandom(10_000), digest=digest_of(body))  # not the digest's bytes
    assert (cache.fills, cache.fill_failures) == (0, 3)
    assert os.listdir(tmp_path / DATA) == os.listdir(tmp_path / TMP) == []
    key = ("db", "doc", "abandoned", digest_of(body))
    writing = cache.start_fill(key, AttachmentInfo(b"x/y", len(body), key[3]), stored_compressed=False)
    writing.append(body[:5000])
    writing.abandon()
    writing.commit()  # too late: an abandoned fill stays abandoned
    assert (cache.fills, cache.fill_failures, os.listdir(tmp_path / TMP)) == (0, 4, [])


def test_a_compressed_attachment_is_checked_by_length(tmp_path):
    """CouchDB's digest of a gzip-stored attachment is of the compressed bytes."""
    cache = make_cache(tmp_path)
    body = os.urandom(10_000)
    key = fill(
        cache, "log.txt", body, digest="md5-" + base64.b64encode(b"c" * 16).decode(), stored_compressed=True
    )
    assert read(cache, key, len(body)) == body
    fill(cache, "cut.txt", body[:-1], digest=key[3], length=len(body), stored_compressed=True)
    assert cache.fill_failures == 1


def test_one_fill_per_file_at_a_time(tmp_path):
    cache = make_cache(tmp_path)
    body = os.urandom(10_000)
    key = ("db", "doc", "f", digest_of(body))
    info = AttachmentInfo(b"x/y", len(body), key[3])
    first = cache.start_fill(key, info, stored_compressed=False)
    assert cache.start_fill(key, info, stored_compressed=False) is None
    first.abandon()
    assert cache.start_fill(key, info, stored_compressed=False) is not None


def test_a_dropped_database_loses_its_files_and_the_ones_being_written(tmp_path):
    cache = make_cache(tmp_path)
    other = fill(cache, "other.bin", os.urandom(1000), db="other")
    fill(cache, "a.bin", os.urandom(1000))
    body = os.urandom(2000)
    key = ("db", "doc", "writing.bin", digest_of(body))
    writing = cache.start_fill(key, AttachmentInfo(b"x/y", len(body), key[3]), stored_compressed=False)
    writing.append(body[:1000])
    cache.drop_database("db")
    writing.append(body[1000:])
    writing.commit()
    assert (os.listdir(tmp_path / TMP), os.listdir(tmp_path / DATA)) == ([], [file_name(other)])
    assert (len(cache), cache.evictions, cache.fill_failures) == (1, 1, 1)


def test_sizes_outside_the_bounds_are_not_kept(tmp_path):
    cache = make_cache(tmp_path, max_bytes=100_000, max_item=200_000)
    assert cache.max_item == 100_000
    assert not cache.wants(0) and not cache.wants(None) and not cache.wants(100_001)
    assert cache.wants(1) and cache.wants(90_000)
    assert not DiskCache(None, 10**9, 10**9).wants(1000)
    assert not DiskCache(str(tmp_path / "off"), 0, 10**9).wants(1000)


def test_a_file_evicted_while_it_is_read_keeps_its_bytes_for_that_reader(tmp_path):
    cache = make_cache(tmp_path, max_bytes=50_000, max_item=40_000)
    body = os.urandom(40_000)
    key = fill(cache, "a", body)
    opened = cache.open(key, len(body))
    fill(cache, "b", os.urandom(40_000))  # evicts "a"
    assert cache.open(key, len(body)) is None
    assert os.pread(opened.fd, opened.length, opened.offset) == body
    os.close(opened.fd)


def test_take_over_keeps_good_files_in_their_order_and_drops_the_rest(tmp_path):
    cache = make_cache(tmp_path, max_bytes=100_000, max_item=40_000)
    keys = [fill(cache, f"f{i}", os.urandom(30_000)) for i in range(3)]
    for age, key in enumerate(keys):  # f0 newest, f2 oldest
        os.utime(tmp_path / DATA / file_name(key), ns=(10**18 - age * 10**9,) * 2)
    with open(tmp_path / DATA / file_name(keys[1]), "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x80]))  # the right size, the wrong bytes
    again = make_cache(tmp_path, max_bytes=100_000, max_item=40_000)
    assert read(again, keys[1], 30_000) is None
    assert sorted(os.listdir(tmp_path / DATA)) == sorted(file_name(key) for key in (keys[0], keys[2]))
    fill(again, "new", os.urandom(30_000))
    fill(again, "newer", os.urandom(30_000))
    assert read(again, keys[2], 30_000) is None  # the oldest went first
    assert read(again, keys[0], 30_000) is not None


def test_another_format_is_cleared_and_a_foreign_directory_refused(tmp_path):
    cache = make_cache(tmp_path / "cache")
    key = fill(cache, "f", os.urandom(1000))
    (tmp_path / "cache" / MARKER_NAME).write_text("couchtoken disk cache, format 0\n")
    again = make_cache(tmp_path / "cache")
    assert (len(again), os.listdir(tmp_path / "cache" / DATA)) == (0, [])
    assert read(again, key, 1000) is None
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert directory_problem(str(foreign)) is not None
    assert directory_problem(str(tmp_path / "cache")) is None
    assert directory_problem(str(tmp_path / "new")) is None
    (tmp_path / "file").write_text("x")
    assert directory_problem(str(tmp_path / "file")) == "is not a directory"
    off = DiskCache(str(foreign), 10**6, 10**6, run_in_thread=in_this_thread)
    off.take_over()
    assert not off.enabled
    assert os.listdir(foreign) == ["thesis.tex"]


class HeldThreads:
    """Runs the cache's thread work only when told to (the work itself is real)."""

    def __init__(self):
        self.held = []

    def __call__(self, function, *args):
        waiting = Deferred()
        self.held.append((waiting, function, args))
        return waiting

    def release(self):
        while self.held:
            waiting, function, args = self.held.pop(0)
            waiting.callback(function(*args))


def test_fills_the_disk_cannot_keep_up_with_are_dropped_without_holding_the_downloads(tmp_path):
    threads = HeldThreads()
    cache = DiskCache(str(tmp_path), 10**9, 10**9, run_in_thread=threads)
    cache.take_over()
    body = os.urandom(MIB)
    fills = []
    for name in ("one", "two"):
        key = ("db", "doc", name, "md5-" + base64.b64encode(b"d" * 16).decode())
        fills.append(cache.start_fill(key, AttachmentInfo(b"x/y", 40 * MIB, key[3]), stored_compressed=True))
    assert MAX_LAG == 32 * MIB
    for count, writing in zip((10, 25), fills, strict=True):
        for _ in range(count):
            writing.append(body)  # the first write of each is still running: the rest queue
    # Together they may be 32 MiB behind: the second went past it and is dropped...
    assert (cache.fill_failures, cache.filling) == (0, 2)
    threads.release()  # ...once its running write is back
    assert (cache.fill_failures, cache.filling, len(os.listdir(tmp_path / TMP))) == (1, 1, 1)
    for _ in range(30):
        fills[0].append(body)
        threads.release()  # a disk that keeps up
    fills[0].commit()
    threads.release()
    assert (cache.fills, cache.fill_failures, cache.filling, os.listdir(tmp_path / TMP)) == (1, 1, 0, [])


def test_a_fill_abandoned_while_it_writes_is_removed_once_the_write_is_back(tmp_path):
    threads = HeldThreads()
    cache = DiskCache(str(tmp_path), 10**9, 10**9, run_in_thread=threads)
    cache.take_over()
    body = os.urandom(100_000)
    key = ("db", "doc", "f", digest_of(body))
    writing = cache.start_fill(key, AttachmentInfo(b"x/y", len(body), key[3]), stored_compressed=False)
    writing.append(body[:50_000])
    writing.abandon()
    writing.append(body[50_000:])
    writing.commit()
    threads.release()
    assert (cache.fills, cache.fill_failures, os.listdir(tmp_path / TMP), os.listdir(tmp_path / DATA)) == (
        0,
        1,
        [],
        [],
    )
    again = cache.start_fill(key, AttachmentInfo(b"x/y", len(body), key[3]), stored_compressed=False)
    again.append(body)
    again.commit()
    assert cache.filling == 1  # written and checked in the threads, not yet
    threads.release()
    assert (cache.fills, cache.filling, read(cache, key, len(body))) == (1, 0, body)


@pytest_twisted.ensureDeferred
async def test_fills_are_checked_at_a_lower_cpu_priority_and_written_at_the_usual_one():
    """The MD5 gives way to serving downloads (and to a CouchDB on the same machine)."""
    pools, write, check = disk_threads(reactor)
    for pool in pools:
        pool.start()
    try:
        priority = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # noqa: E731
        checking, writing = await check(priority), await write(priority)
    finally:
        for pool in pools:
            pool.stop()
    outside = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert (checking, writing) == (min(19, outside + NICE), outside)
