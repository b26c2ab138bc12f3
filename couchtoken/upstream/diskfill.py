"""One disk cache fill: a body written to ``tmp/`` as it streams past, checked, renamed into place.

The reactor thread only queues the chunks the relay hands over; writing them,
and the MD5 of the finished file (read back from the page cache, so what is
checked is what is on disk), run in the disk cache's threads, one batch at a
time per fill, in order.  Writes run at normal priority, to keep pace; the
MD5, after the download, in lower-priority threads (``run_check``).  A
download never waits for its fill: when the fills together fall more than
``MAX_LAG`` bytes behind (a disk slower than the network), the fill that
would go past it is dropped instead, so memory stays bounded.

Endings, each reported once through ``on_end``:
- ``commit`` after the whole body: the length is checked, the MD5 computed
  and, where CouchDB's digest is of these bytes, compared with it; then
  the file is renamed into ``data/`` (atomic);
- ``abandon`` (the download was cut or failed), a write error (disk full),
  a wrong length or digest: the temporary file is deleted.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable
from typing import IO

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from couchtoken.upstream.diskfiles import CacheKey

_log = Logger()
BATCH = 1024 * 1024  # bytes handed to a thread at once: fewer thread hand-offs
MAX_LAG = 32 * 1024 * 1024  # bytes all fills together may be behind the downloads
_READ_BACK = 1024 * 1024

RunInThread = Callable[..., Deferred]
# on_end(fill, error, why): why is None when the file is in place; error is an OSError behind a failure.
OnEnd = Callable[["DiskFill", OSError | None, str | None], None]


class DiskFill:
    """One body being written; ``append`` its chunks, then ``commit`` or ``abandon``."""

    def __init__(
        self,
        key: CacheKey,
        handle: IO[bytes],
        tmp_path: str,
        final_path: str,
        *,
        size: int,
        offset: int,
        length: int,
        md5_position: int,
        expected_md5: bytes | None,
        run_in_thread: RunInThread,
        on_end: OnEnd,
        lag: LagBudget,
        run_check: RunInThread | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.key = key
        self._handle = handle
        self._tmp_path = tmp_path
        self.final_path = final_path
        self.size = size  # the whole file, header included
        self.offset = offset
        self.length = length
        self._md5_position = md5_position
        self._expected_md5 = expected_md5
        self._run_in_thread = run_in_thread
        self._run_check = run_check or run_in_thread
        self._on_end = on_end
        self._lag = lag
        self._stopping = stopping
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in the queue
        self._writing = 0  # bytes handed to a thread, not yet written
        self._received = 0
        self._busy = False  # a batch (or the seal) is running in a thread
        self._commit_wanted = False
        self._failure: tuple[str, OSError | None] | None = None
        self.ended = False

    def append(self, data: bytes) -> None:
        """The next bytes of the body (the relay's tee)."""
        if self.ended or self._failure is not None:
            return
        self._received += len(data)
        if self._received > self.length:
            self._fail("more bytes than the attachment's length")
            return
        if not self._lag.take(len(data)):
            self._fail(f"the disk fell {self._lag.limit // 2**20} MiB behind the downloads")
            return
        self._queue.append(data)
        self._queued += len(data)
        self._next()

    def commit(self) -> None:
        """The body is complete: once written, check it and rename it into place."""
        if self.ended or self._failure is not None or self._commit_wanted:
            return
        if self._received != self.length:
            self._fail(f"got {self._received} bytes of {self.length}")
            return
        self._commit_wanted = True
        self._next()

    def abandon(self, why: str = "the download did not complete") -> None:
        """The download was cut or failed: leave nothing behind."""
        if not self.ended and self._failure is None and not self._commit_wanted:
            self._fail(why)

    # The work in threads, one step at a time.
    def _next(self) -> None:
        if self._busy or self.ended:
            return
        if self._failure is not None:
            self._end_failed()
        elif self._queue and (self._queued >= BATCH or self._commit_wanted):
            batch = list(self._queue)
            self._queue.clear()
            self._writing, self._queued = self._queued, 0
            self._busy = True
            writing = self._run_in_thread(_write_all, self._handle, batch)
            writing.addCallbacks(self._written, self._thread_failed)
        elif self._commit_wanted:
            sealing = self._run_check(
                _seal, self._handle, self.offset, self.length, self._md5_position, self._stopping
            )
            self._busy = True
            sealing.addCallbacks(self._sealed, self._thread_failed)

    def _written(self, _: object) -> None:
        self._busy = False
        self._lag.give(self._writing)
        self._writing = 0
        self._next()

    def _thread_failed(self, failure: Failure) -> None:
        self._busy = False
        self._lag.give(self._writing)
        self._writing = 0
        error = failure.value if isinstance(failure.value, OSError) else None
        if error is None:  # a bug, not an I/O error: say so, and still leave nothing behind
            _log.failure("Disk cache fill failed unexpectedly", failure)
        self._fail("write failed", error)

    def _sealed(self, digest: bytes | None) -> None:
        self._busy = False
        if digest is None:
            self._fail("stopped before it was checked")
        elif self._expected_md5 is not None and digest != self._expected_md5:
            self._fail("the bytes do not match CouchDB's digest")
        else:
            try:
                os.rename(self._tmp_path, self.final_path)
            except OSError as exc:
                self._fail("rename failed", exc)
                return
            self.ended = True
            self._on_end(self, None, None)

    def _fail(self, why: str, error: OSError | None = None) -> None:
        if self._failure is None:
            self._failure = (why, error)
        self._queue.clear()
        self._lag.give(self._queued)
        self._queued = 0
        self._next()  # cleans up now, or once the running step is back

    def _end_failed(self) -> None:
        assert self._failure is not None
        self.ended = True
        _close_and_unlink(self._handle, self._tmp_path)
        why, error = self._failure
        self._on_end(self, error, why)


class LagBudget:
    """Bytes received for fills but not yet written, across all fills: bounded, so memory is."""

    def __init__(self, limit: int = MAX_LAG) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int) -> bool:
        if self.used + count > self.limit:
            return False
        self.used += count
        return True

    def give(self, count: int) -> None:
        self.used -= count


def _write_all(handle: IO[bytes], chunks: list[bytes]) -> None:
    for chunk in chunks:
        handle.write(chunk)


def _seal(
    handle: IO[bytes], offset: int, length: int, md5_position: int, stopping: Callable[[], bool]
) -> bytes | None:
    """Flush, read the body back for its MD5, write that into the header, close; the MD5 (None: stopped)."""
    handle.flush()
    fd = handle.fileno()
    if os.fstat(fd).st_size != offset + length:
        raise OSError(f"the file holds {os.fstat(fd).st_size - offset} bytes of {length}")
    md5 = hashlib.md5()
    position, remaining = offset, length
    while remaining:
        if stopping():
            return None
        chunk = os.pread(fd, min(_READ_BACK, remaining), position)
        if not chunk:
            raise OSError("the file ended early")
        md5.update(chunk)
        position += len(chunk)
        remaining -= len(chunk)
    os.pwrite(fd, md5.hexdigest().encode("ascii"), md5_position)
    handle.close()
    return md5.digest()


def _close_and_unlink(handle: IO[bytes], path: str) -> None:
    try:
        handle.close()
    except OSError:
        pass  # a failed flush of a file we delete anyway
    try:
        os.unlink(path)
    except OSError:
        pass
