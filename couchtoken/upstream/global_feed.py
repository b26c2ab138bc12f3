"""One feed for every database: ``GET /_db_updates?feed=continuous``, and catch-up reads per database.

Where CouchDB offers it (real CouchDB with a ``_global_changes`` database,
and credentials of a server admin), one continuous ``_db_updates`` feed says
which databases were created, updated or deleted.  A database covered by it
(``GlobalCoverage``) has a *baseline*: its ``update_seq`` (``GET /<db>``),
read when a token check in it first passed.  When the feed says the
database was updated, ``GET /<db>/_changes?since=<baseline>`` reads what
changed, page by page, and those documents are evicted; the baseline moves
on.  A deleted database drops its entries.

The safety invariant, for this feed: a database's cached entries are used
only while the global feed is live (and heard within 2.5 heartbeats) in the
epoch the entries were stored in, the database has a baseline learnt in that
epoch, and no update of it is waiting to be read.  So between an update
event and the end of its catch-up read, the database's checks go to CouchDB;
and a gap of the global feed (a reconnection) forgets every baseline, so
every entry it covers goes.

Catch-up reads and baseline reads are single-flight per database and at
most ``max_reads`` at once, and each takes one of the client's request slots.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from cachetools import LRUCache
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from couchtoken.upstream.client import CouchDBClient, UpstreamError
from couchtoken.upstream.feeds import ChangesFeed, OnChange

OnDrop = Callable[[set[str]], None]

_log = Logger()

GLOBAL_FEED_NAME = "_db_updates"
CATCH_UP_PAGE = 500


class GlobalFeed(ChangesFeed):
    """Follows ``/_db_updates?feed=continuous`` and reports ``(database, event type)``."""

    def __init__(self, client: CouchDBClient, clock: Any, *, on_event: Callable[[str, str], None], **kw: Any):
        super().__init__(GLOBAL_FEED_NAME, client, clock, on_change=lambda db, docid: None, **kw)
        self.checks = False  # the database checks are for PouchDB Server, which has no _db_updates
        self._on_event = on_event

    async def _open(self) -> IResponse:
        return await self._client.open_db_updates(self._heartbeat, self.watchdog_timeout)

    def _refused(self, code: int) -> bool:
        # 400 (PouchDB Server), 404 (no _global_changes), 401/403 (not a server admin), 405, 501...
        return 400 <= code < 500

    def line(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return  # heartbeat
        try:
            event = json.loads(raw)
        except ValueError:
            _log.warn("The _db_updates feed sent a line that is not JSON; reconnecting")
            if self._transport is not None:
                self._transport.stopProducing()
            return
        if isinstance(event, dict):
            db, kind = event.get("db_name"), event.get("type")
            if isinstance(db, str) and isinstance(kind, str):
                self._on_event(db, kind)


@attrs.define(eq=False)
class _Covered:
    """What is known of one database covered by the global feed."""

    epoch: int  # the global feed's epoch the baseline belongs to
    since: Any = None  # the baseline: every change after it is read (None: still being learnt)
    updated: bool = False  # an update was announced and not yet read
    reading: bool = False  # a baseline or catch-up read is in flight


class GlobalCoverage:
    """Keeps the cached entries of databases without a feed of their own fresh, from the global feed."""

    def __init__(
        self,
        client: CouchDBClient,
        feed: GlobalFeed,
        *,
        on_change: OnChange,
        on_drop: OnDrop,
        max_databases: int,
        max_reads: int = 8,
    ) -> None:
        self._client = client
        self._feed = feed
        self._on_change = on_change
        self._on_drop = on_drop  # these databases' entries (and bodies) must go
        self._covered: LRUCache[str, _Covered] = LRUCache(maxsize=max(max_databases, 1))
        self._reads = DeferredSemaphore(max_reads)
        self._in_flight: set[Deferred] = set()
        self.catch_ups = 0  # catch-up reads made
        self.baselines = 0  # baseline reads made

    def __len__(self) -> int:
        return len(self._covered)

    def live_epoch(self, db: str) -> int | None:
        """The global feed's epoch, while it vouches for ``db``'s entries; else None."""
        if not self._feed.fresh():
            return None
        covered = self._covered.get(db)
        if covered is None or covered.epoch != self._feed.epoch:
            return None
        if covered.since is None or covered.updated or covered.reading:
            return None
        return covered.epoch

    def cover(self, db: str) -> None:
        """A token check in ``db`` passed: cover it (learning its baseline, once per feed epoch)."""
        if not self._feed.fresh():
            return
        covered = self._covered.get(db)  # also marks it recently used
        if covered is not None and covered.epoch == self._feed.epoch:
            return
        covered = self._covered[db] = _Covered(epoch=self._feed.epoch, reading=True)
        self._start(self._learn(db, covered))

    def forget(self, db: str) -> None:
        """``db`` has a feed of its own now (or is gone): the global feed no longer covers it."""
        self._covered.pop(db, None)

    def event(self, db: str, kind: str) -> None:
        """The global feed reported ``kind`` (created, updated, deleted) for ``db``."""
        if kind in ("deleted", "created"):
            had = self._covered.pop(db, None)
            self._on_drop({db})  # the database went (or came back new): nothing of it stays in memory
            if had is not None:
                _log.debug("Database {db} was {kind}; its cached checks are dropped", db=db, kind=kind)
            return
        covered = self._covered.get(db)
        if covered is None:
            return
        covered.updated = True
        if not covered.reading and covered.since is not None:
            covered.reading = True
            self._start(self._catch_up(db, covered))

    def gap(self) -> None:
        """The global feed lost its connection: forget every baseline (and so every entry it covered)."""
        dropped = set(self._covered.keys())
        self._covered.clear()
        self._on_drop(dropped)

    def stop(self) -> None:
        for reading in list(self._in_flight):
            reading.cancel()

    def _start(self, work: Any) -> None:
        reading = Deferred.fromCoroutine(work)
        self._in_flight.add(reading)
        reading.addErrback(lambda failure: failure.trap(CancelledError))
        reading.addBoth(lambda _: self._in_flight.discard(reading))

    def _current(self, db: str, covered: _Covered) -> bool:
        return self._covered.get(db) is covered and covered.epoch == self._feed.epoch and self._feed.live

    async def _learn(self, db: str, covered: _Covered) -> None:
        """Read ``db``'s update_seq: every later change will be read on its update event."""
        await self._reads.acquire()
        try:
            self.baselines += 1
            since = await self._client.database_update_seq(db)
        except UpstreamError as exc:
            _log.info("Cannot read the update_seq of {db} ({detail})", db=db, detail=exc.detail)
            since = None
        finally:
            self._reads.release()
        if not self._current(db, covered):
            return
        if since is None:  # missing, or no answer: not covered; the next passed check tries again
            self._covered.pop(db, None)
            return
        covered.since = since
        if covered.updated:  # updated while the baseline was read: read what came after it
            self._start(self._catch_up(db, covered))
        else:
            covered.reading = False

    async def _catch_up(self, db: str, covered: _Covered) -> None:
        """Read what changed in ``db`` since its baseline, evict those documents, move the baseline on."""
        await self._reads.acquire()
        try:
            while self._current(db, covered) and covered.updated:
                covered.updated = False
                self.catch_ups += 1
                page = await self._client.changes_since(db, covered.since, CATCH_UP_PAGE)
                if not self._current(db, covered):
                    return
                if page is None:  # the database is gone
                    self._covered.pop(db, None)
                    self._on_drop({db})
                    return
                docids, last_seq, pending = page
                for docid in docids:
                    self._on_change(db, docid)
                covered.since = last_seq
                if pending:
                    covered.updated = True
        except UpstreamError as exc:
            _log.warn(
                "Cannot read the changes of {db} ({detail}); its cached checks are dropped",
                db=db,
                detail=exc.detail,
            )
            if self._covered.get(db) is covered:
                self._covered.pop(db, None)
                self._on_drop({db})
            return
        finally:
            self._reads.release()
        covered.reading = False
