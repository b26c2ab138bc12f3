"""Hot large attachments kept on local disk, keyed by their digest.

Like the memory blob cache, the key is (database, document id, attachment,
CouchDB's digest) and the digest comes from the feed-fresh document summary,
after the token check: new content is a new key, so old bytes are never
served for it.  A file is written only as the first whole, identity-encoded
download streams past to its client (a *fill*: no second read from CouchDB),
into ``tmp/``; when the body is complete it is checked (its length, and its
MD5 against CouchDB's digest where that digest is of the stored bytes) and
renamed into ``data/`` atomically.  A fill that is cut, fails or mismatches
is deleted.  One fill per key at a time: other clients of a file being
filled are relayed from CouchDB as before and write nothing.

The files are bounded in bytes (least recently used go first, room is made
before a fill starts).  At start the directory is taken over: leftovers in
``tmp/`` and files that are not ours are removed, and every data file is
checked against its header and digest in a thread before it is served.
Any I/O error (disk full, the directory gone, a read error, a file of the
wrong size) drops the file and the download is served from CouchDB; it is
counted in ``fallbacks``.

On the reactor thread: the index, ``open``, ``fstat``, ``rename`` and
``unlink`` (short system calls) and the 64 KiB ``pread`` calls that serve a
file (fast from the page cache; a read that must wait for the disk holds the
reactor that long).  In the cache's own threads: writing a fill and its MD5
check (``diskfill``), and the start-up checks.  There is no ``fsync``: a
file torn by a crash fails its check at the next start.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from couchtoken.access.attachments import AttachmentInfo
from couchtoken.upstream.diskfiles import (
    DATA,
    MARKER_NAME,
    MARKER_TEXT,
    TMP,
    CacheKey,
    Header,
    body_matches,
    digest_md5,
    file_name,
    looks_like_file_name,
    read_header,
)
from couchtoken.upstream.diskfill import DiskFill, LagBudget

_log = Logger()
NICE = 10
_thread_state = threading.local()
RunInThread = Callable[..., Deferred]


class ForeignDirectory(Exception):
    """The directory holds files but no marker: it is not a couchtoken cache."""


def directory_problem(directory: str) -> str | None:
    """Why ``directory`` cannot hold the disk cache (for a usage error at start), or None."""
    if not os.path.exists(directory):
        return None  # created at start
    if not os.path.isdir(directory):
        return "is not a directory"
    try:
        names = os.listdir(directory)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if names and MARKER_NAME not in names:
        return "holds files but is not a couchtoken disk cache; give an empty or new directory"
    return None


@attrs.define(eq=False)
class _Entry:
    """One data file in the index."""

    key: CacheKey
    path: str
    size: int  # the whole file, header included
    offset: int  # where the body starts
    length: int  # the body
    verified: bool = True  # False for a file taken over at start until its check passes


@attrs.frozen
class CachedBody:
    """An open data file: the body is ``length`` bytes from ``offset``; the reader closes ``fd``."""

    fd: int
    offset: int
    length: int


class DiskCache:
    """Attachment bodies on disk, LRU and bounded in bytes (no directory or 0 bytes: off)."""

    def __init__(
        self,
        directory: str | None,
        max_bytes: int,
        max_item: int,
        *,
        run_in_thread: RunInThread = deferToThread,
        run_check: RunInThread | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_item = min(max_item, max_bytes)
        self._run_in_thread = run_in_thread  # writes
        self._run_check = run_check or run_in_thread  # MD5 checks, at a lower priority
        self._lag = LagBudget()
        self._usable = False  # until the directory is taken over
        self._stopping = False
        self._index: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._filling: dict[CacheKey, DiskFill] = {}
        self._reserved = 0
        self._failing = False  # a write or open failed: log once until a fill succeeds
        self.bytes_held = 0
        self.pending_checks = 0
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.fill_failures = 0
        self.evictions = 0
        self.fallbacks = 0

    @property
    def enabled(self) -> bool:
        return self._usable

    def __len__(self) -> int:
        return len(self._index)

    @property
    def filling(self) -> int:
        """Fills under way (being written, or being checked)."""
        return len(self._filling)

    def _path(self, *parts: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, *parts)

    def wants(self, length: int | None) -> bool:
        """Whether a body of ``length`` bytes belongs on disk."""
        return self._usable and length is not None and 0 < length <= self.max_item

    # Serving.
    def open(self, key: CacheKey, length: int | None) -> CachedBody | None:
        """The file for ``key`` opened for reading, or None (a miss); a bad file is dropped."""
        entry = self._index.get(key) if self._usable else None
        if entry is None or not entry.verified:
            self.misses += 1
            return None
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._lost(entry, f"cannot be opened ({exc.strerror})")
            self.misses += 1
            return None
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            self._lost(entry, f"cannot be read ({exc.strerror})")
            self.misses += 1
            return None
        if size != entry.size or entry.length != length:
            os.close(fd)
            self._lost(entry, f"has {size} bytes, not {entry.size}")
            self.misses += 1
            return None
        self._index.move_to_end(key)
        self.hits += 1
        return CachedBody(fd=fd, offset=entry.offset, length=entry.length)

    def broken(self, key: CacheKey, why: str) -> None:
        """A file being served failed to read: drop it (the download goes on from CouchDB)."""
        entry = self._index.get(key)
        if entry is not None:
            self._lost(entry, why)
        else:
            self.fallbacks += 1

    def _lost(self, entry: _Entry, why: str) -> None:
        _log.warn(
            "Disk cache file {name} {why}; dropped, the download comes from CouchDB",
            name=os.path.basename(entry.path),
            why=why,
        )
        self.fallbacks += 1
        self._remove(entry)

    # Filling.
    def start_fill(self, key: CacheKey, info: AttachmentInfo, *, stored_compressed: bool) -> DiskFill | None:
        """A fill for a body about to stream past, or None (not wanted, being filled, I/O error).

        ``stored_compressed``: CouchDB keeps the attachment gzip-compressed, so its
        digest is of other bytes than these and only the length can be checked.
        """
        if not self.wants(info.length) or key in self._filling or info.length is None:
            return None
        identity = not stored_compressed and digest_md5(key[3]) is not None
        encoded = Header.blank(key, info.length, identity).encode()
        size = len(encoded) + info.length
        if size > self.max_bytes:
            return None
        self._make_room(size)
        tmp_path = self._path(TMP, f"{file_name(key)}.{uuid.uuid4().hex}")
        handle: IO[bytes] | None = None
        try:
            try:
                handle = open(tmp_path, "xb+")  # noqa: SIM115 - the fill owns it until commit or abandon
            except FileNotFoundError:
                self._make_directories()
                handle = open(tmp_path, "xb+")  # noqa: SIM115
            handle.write(encoded)
        except OSError as exc:
            if handle is not None:
                handle.close()
                _remove_path(tmp_path)
            self._write_failed(exc)
            self.fill_failures += 1
            return None
        fill = DiskFill(
            key,
            handle,
            tmp_path,
            self._path(DATA, file_name(key)),
            size=size,
            offset=len(encoded),
            length=info.length,
            md5_position=Header.md5_position(encoded),
            expected_md5=digest_md5(key[3]) if identity else None,
            run_in_thread=self._run_in_thread,
            run_check=self._run_check,
            lag=self._lag,
            on_end=self._fill_ended,
            stopping=lambda: self._stopping,
        )
        self._filling[key] = fill
        self._reserved += size
        return fill

    def _fill_ended(self, fill: DiskFill, error: OSError | None, why: str | None) -> None:
        """A fill ended: committed (``why`` None) or failed."""
        self._filling.pop(fill.key, None)
        self._reserved -= fill.size
        if why is not None:
            self.fill_failures += 1
            if error is not None:
                self._write_failed(error)
            else:
                _log.info("Disk cache fill dropped: {why}", why=why)
            return
        self.fills += 1
        if self._failing:
            _log.info("Disk cache writes work again")
            self._failing = False
        old = self._index.get(fill.key)
        if old is not None:  # a file taken over at start, not yet checked: replaced by the rename
            self._forget(old)
        entry = _Entry(fill.key, fill.final_path, fill.size, fill.offset, fill.length)
        self._index[fill.key] = entry
        self.bytes_held += entry.size
        self._make_room(0)

    def _write_failed(self, exc: OSError) -> None:
        self.fallbacks += 1
        if not self._failing:
            self._failing = True
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            _log.warn(
                "Disk cache cannot write{full}: {error}; downloads come from CouchDB until it can",
                full=full,
                error=exc.strerror or str(exc) or type(exc).__name__,
            )

    # Bounds and removal.
    def _make_room(self, size: int) -> None:
        """Evict least recently used files until ``size`` more bytes fit."""
        while self._index and self.bytes_held + self._reserved + size > self.max_bytes:
            _, entry = next(iter(self._index.items()))
            self._remove(entry)
            self.evictions += 1

    def drop_database(self, db: str) -> None:
        """The database is gone: delete its files, and do not keep the ones being written."""
        for entry in [entry for key, entry in self._index.items() if key[0] == db]:
            self._remove(entry)
            self.evictions += 1
        for fill in [fill for key, fill in self._filling.items() if key[0] == db]:
            fill.abandon("its database is gone")

    def _forget(self, entry: _Entry) -> None:
        if self._index.get(entry.key) is entry:
            del self._index[entry.key]
            self.bytes_held -= entry.size

    def _remove(self, entry: _Entry) -> None:
        """Out of the index and off the disk (a reader with the file open keeps its bytes)."""
        self._forget(entry)
        try:
            os.unlink(entry.path)
        except OSError:
            pass

    # Start and stop.
    def take_over(self) -> Deferred[None]:
        """Make the directory usable, keeping what it holds; fires when every file is checked."""
        if not self.directory or self.max_bytes <= 0:
            return succeed(None)
        self._stopping = False
        try:
            found = self._prepare()
        except ForeignDirectory:
            _log.error(
                "The disk cache directory {directory} holds files but is not a couchtoken disk "
                "cache; the disk cache is off",
                directory=self.directory,
            )
            return succeed(None)
        except OSError as exc:
            _log.error(
                "The disk cache directory {directory} cannot be used ({error}); the disk cache is off",
                directory=self.directory,
                error=exc.strerror or type(exc).__name__,
            )
            return succeed(None)
        self._usable = True
        entries = []
        for header, offset, stat in sorted(found, key=lambda item: item[2].st_mtime_ns):
            entry = _Entry(
                header.key,
                self._path(DATA, file_name(header.key)),
                stat.st_size,
                offset,
                header.length,
                verified=False,
            )
            self._index[entry.key] = entry
            self.bytes_held += entry.size
            entries.append((entry, header))
        self._make_room(0)
        self.pending_checks = len(entries)
        return Deferred.fromCoroutine(self._check_all(entries))

    def _make_directories(self) -> None:
        """The marker, ``data/`` and ``tmp/`` (again, if someone deleted them while running)."""
        os.makedirs(self._path(TMP), exist_ok=True)
        os.makedirs(self._path(DATA), exist_ok=True)
        marker = self._path(MARKER_NAME)
        if not os.path.exists(marker):
            with open(marker, "w", encoding="utf-8") as handle:
                handle.write(MARKER_TEXT)

    def _prepare(self) -> list[tuple[Header, int, os.stat_result]]:
        """Create or clean the directory; the headers of the data files worth checking."""
        assert self.directory is not None
        if os.path.isdir(self.directory):
            names = os.listdir(self.directory)
            if names and MARKER_NAME not in names:
                raise ForeignDirectory()
        os.makedirs(self.directory, exist_ok=True)
        try:
            with open(self._path(MARKER_NAME), encoding="utf-8") as handle:
                ours = handle.read() == MARKER_TEXT
        except FileNotFoundError:
            ours = False
        if not ours:  # new, or another format: start empty
            shutil.rmtree(self._path(DATA), ignore_errors=True)
        shutil.rmtree(self._path(TMP), ignore_errors=True)  # fills cut by a stop or a crash
        self._make_directories()
        found = []
        for name in os.listdir(self._path(DATA)):
            path = self._path(DATA, name)
            header = None
            if looks_like_file_name(name) and os.path.isfile(path):
                try:
                    header = read_header(path)
                except OSError:
                    header = None
            if header is None:
                _log.warn("Disk cache: removing {name}, which is not a cache file", name=name)
                _remove_path(path)
            else:
                found.append(header)
        return found

    async def _check_all(self, entries: list[tuple[_Entry, Header]]) -> None:
        kept = dropped = 0
        for entry, header in entries:
            if self._stopping:
                return
            if self._index.get(entry.key) is entry:  # not evicted or replaced by a fill meanwhile
                try:
                    good = await self._run_check(
                        body_matches, entry.path, header, entry.offset, lambda: self._stopping
                    )
                except OSError:
                    good = False
                if good is None or self._stopping:
                    return
                if self._index.get(entry.key) is entry:
                    if good:
                        entry.verified = True
                        kept += 1
                    else:
                        _log.warn(
                            "Disk cache file {name} failed its check at start; removed",
                            name=os.path.basename(entry.path),
                        )
                        self._remove(entry)
                        dropped += 1
            self.pending_checks -= 1
        _log.info(
            "Disk cache at {directory}: took over {kept} files ({mib:.1f} MiB), removed {dropped} bad",
            directory=self.directory,
            kept=kept,
            mib=self.bytes_held / 2**20,
            dropped=dropped,
        )

    def stop(self) -> None:
        """Stop the start-up checks (a thread reading a file stops at its next chunk)."""
        self._stopping = True


def _remove_path(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


class DiskCacheService(Service):
    """Starts the cache's threads and takes the directory over; stops both at stop."""

    def __init__(self, cache: DiskCache, threads: Sequence[ThreadPool] = ()) -> None:
        self._cache = cache
        self._threads = list(threads)
        self.ready: Deferred[None] = succeed(None)

    def startService(self) -> None:
        super().startService()
        for pool in self._threads:
            pool.start()
        self.ready = self._cache.take_over()

    def stopService(self) -> Any:
        super().stopService()
        self._cache.stop()  # threads reading a file stop at their next chunk
        for pool in self._threads:
            pool.stop()


def disk_threads(reactor: Any) -> tuple[list[ThreadPool], RunInThread, RunInThread]:
    """The disk cache's own threads (not the reactor's, which also resolves host names).

    Two pools: writers at normal priority, so fills keep pace with downloads;
    checkers (the MD5 of a finished fill, the start-up checks) at a lower CPU
    priority (nice 10, per thread on Linux), so they give way to serving
    downloads and to a CouchDB on the same machine.
    """
    writers = ThreadPool(minthreads=0, maxthreads=2, name="couchtoken-disk-writes")
    checkers = ThreadPool(minthreads=0, maxthreads=2, name="couchtoken-disk-checks")

    def write(function: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(reactor, writers, function, *args)

    def check(function: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(reactor, checkers, _yielding, function, *args)

    return [writers, checkers], write, check


def _yielding(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function`` in a thread whose CPU priority is lowered (once; a no-op where unsupported)."""
    if not getattr(_thread_state, "niced", False):
        _thread_state.niced = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        except (OSError, AttributeError):
            pass
    return function(*args)
