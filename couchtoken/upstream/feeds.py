"""One continuous ``_changes`` feed per database with cached documents.

Each feed is a Twisted ``Service`` under ``FeedManager``.  It reads the feed
line by line as it streams; every change evicts that document from the cache
(a deletion is a change too).  A heartbeat is requested from CouchDB, and a
watchdog on the injected clock drops the connection when neither a change
nor a heartbeat arrives in time.  Errors, server closes and watchdog expiries
are retried with ``backoffPolicy`` (jittered, capped).  A 404 means the
database is gone: its entries are dropped and its feed stops until needed.

A feed is *live* from the moment CouchDB's response headers arrive (the feed
was asked for ``since=now``, so every later change will be delivered) until
its connection is lost.  Its cached entries are used only while it has been
heard (a change or a heartbeat) within the last 2.5 heartbeats, so a
connection that goes silent without closing cannot keep a revoked token
working for more than about 3 heartbeats, whatever the server does.  Each
live period has its own epoch number; see ``couchtoken.upstream.cache`` for
how entries are tied to it.

A feed must not outlive its database.  Real CouchDB ends the feeds of a
deleted database (the feed closes: a gap, then a 404).  On a server that
does not (PouchDB Server, learnt once from ``GET /``), a live feed also asks
for the database's latest change once a heartbeat (see
``couchtoken.upstream.following``): a
404 stops the feed as a 404 at connect does, a database that is no longer
the one the feed follows makes it reconnect, and its entries are used only
while such a check, sent within the last 2.5 heartbeats (1 s at least),
has found the feed following.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from couchtoken.upstream.client import CouchDBClient, UpstreamError
from couchtoken.upstream.following import Change, FollowCheck

_log = Logger()

# Entries of a feed silent for longer than this many heartbeats are not used.
STALE_AFTER_HEARTBEATS = 2.5
# Nor, where database checks run, those of a feed last found following longer ago than this.
MIN_CHECK_WINDOW = 1.0

OnChange = Callable[[str, str], None]
OnGap = Callable[[str], None]


class _FeedLines(LineOnlyReceiver):
    """Splits the streamed body into lines; every byte feeds the watchdog."""

    delimiter = b"\n"
    MAX_LENGTH = 1024 * 1024

    def __init__(self, feed: ChangesFeed) -> None:
        self._feed = feed
        self.finished: Deferred[BaseException] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._feed.heard()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self._feed.line(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.finished.callback(reason.value)  # the exception, not the Failure: this is no error


class ChangesFeed(Service):
    """Follows ``/<db>/_changes?feed=continuous`` and reports each changed document id."""

    def __init__(
        self,
        db: str,
        client: CouchDBClient,
        clock: Any,
        *,
        heartbeat: float,
        on_change: OnChange,
        on_gap: OnGap,
        on_gone: OnGap,
        policy: Callable[[int], float] | None = None,
        epochs: Iterator[int] | None = None,
    ) -> None:
        self.name = db
        self.db = db
        self._epochs = epochs or itertools.count(1)  # shared by a manager's feeds: epochs never repeat
        self._client = client
        self._clock = clock
        self._heartbeat = heartbeat
        self._on_change = on_change
        self._on_gap = on_gap
        self._on_gone = on_gone
        self._policy = policy or backoffPolicy(initialDelay=0.25, maxDelay=30.0, factor=2.0)
        self.live = False
        self.heard_at = 0.0
        self.epoch = 0
        self.last_seq: Any = None
        self.reconnects = 0
        self._attempt = 0
        self._connecting: Deferred | None = None
        self._transport: Any = None
        self._retry: Any = None
        self._watchdog: Any = None
        self._closing: list[Deferred[None]] = []
        self.on_live: Callable[[], None] = lambda: None  # each time the feed goes live
        self.checks: bool | None = None  # whether the database is checked (learnt before the first connect)
        self._following = FollowCheck()
        self._confirmed_at: float | None = None
        self._next_check: Any = None
        self._checking: Deferred | None = None

    @property
    def watchdog_timeout(self) -> float:
        """How long silence may last before the connection is presumed dead."""
        return self._heartbeat * 2 + 1.0

    @property
    def check_window(self) -> float:
        """How long a database check that found the feed following vouches for it."""
        return max(STALE_AFTER_HEARTBEATS * self._heartbeat, MIN_CHECK_WINDOW)

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        self._cancel_timers()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._transport is not None:
            self._transport.stopProducing()
        self._gap()

    def connection_closed(self) -> Deferred[None]:
        """Fires once the feed's connection (if it has one now) is closed."""
        if self._transport is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closing.append(waiter)
        return waiter

    def _connect(self) -> None:
        self._retry = None
        self._connecting = Deferred.fromCoroutine(self._follow())

    async def _open(self) -> IResponse:
        """Start the feed's request (learning first whether this server needs database checks)."""
        if self.checks is None:
            self.checks = not await self._client.feeds_end_with_database()
        return await self._client.open_changes(self.db, self._heartbeat, self.watchdog_timeout)

    def _refused(self, code: int) -> bool:
        """Whether an answer with status ``code`` means the feed cannot be had (a 404: no such database)."""
        return code == 404

    async def _follow(self) -> None:
        try:
            response = await self._open()
        except CancelledError:
            return
        except UpstreamError as exc:
            self._connecting = None
            if not self.running:
                return  # stopped while connecting: the cancelled request is no failure
            _log.warn(
                "Changes feed for {db} could not connect ({kind}): {detail}",
                db=self.db,
                kind=exc.kind,
                detail=exc.detail,
            )
            self._schedule_retry()
            return
        self._connecting = None
        if self._refused(response.code):
            await self._client.discard(response)
            _log.info("{db} answered {status}; its feed stops", db=self.db, status=response.code)
            self._on_gone(self.db)
            return
        if response.code != 200:
            await self._client.discard(response)
            _log.warn("Changes feed for {db} answered {status}", db=self.db, status=response.code)
            self._schedule_retry()
            return
        if not self.running:
            return
        lines = _FeedLines(self)
        response.deliverBody(lines)
        self._transport = lines.transport
        self.epoch = next(self._epochs)
        self.live = True
        self._attempt = 0
        self.heard()
        self.on_live()
        if self.checks:
            self._following = FollowCheck()
            self._confirmed_at = None
            self._check(self.epoch)
        reason = await lines.finished
        self._transport = None
        closing, self._closing = self._closing, []
        for waiter in closing:
            waiter.callback(None)
        if self.live:  # else the gap was had already (a stop, a database check)
            self._gap()
        if self.running:
            _log.info(
                "Changes feed for {db} closed ({why}); reconnecting",
                db=self.db,
                why=type(reason).__name__,
            )
            self._schedule_retry()

    def fresh(self) -> bool:
        """Live, heard within the last 2.5 heartbeats (and, where checked, found following): trusted now."""
        now = self._clock.seconds()
        if not self.live or now - self.heard_at > STALE_AFTER_HEARTBEATS * self._heartbeat:
            return False
        if not self.checks:
            return True
        return self._confirmed_at is not None and now - self._confirmed_at <= self.check_window

    def _check(self, epoch: int) -> None:
        self._next_check = None
        self._checking = Deferred.fromCoroutine(self._check_database(epoch))

    async def _check_database(self, epoch: int) -> None:
        """Ask whether this feed still follows its database; then ask again a heartbeat later."""
        asked = self._following.known
        asked_at = self._clock.seconds()
        try:
            row = await self._client.latest_change(self.db, self.check_window)
        except CancelledError:
            return
        except UpstreamError as exc:
            row = exc  # no answer: nothing confirmed, so the entries lapse; the checks go on
        self._checking = None
        if not self.live or self.epoch != epoch:
            return
        if row is None:
            _log.info("Database {db} is gone; its feed stops", db=self.db)
            self._on_gone(self.db)
            return
        latest = None if isinstance(row, UpstreamError) else Change.from_row(row)
        if latest is not None:
            lost = self._following.judge(asked, latest)
            if lost is not None:
                _log.warn(
                    "Changes feed for {db} no longer follows its database ({why}); reconnecting",
                    db=self.db,
                    why=lost,
                )
                self._gap()
                if self._transport is not None:
                    self._transport.stopProducing()
                return
            self._confirmed_at = asked_at
        self._next_check = self._clock.callLater(self._heartbeat, self._check, epoch)

    def heard(self) -> None:
        """Any bytes from the feed: a change or a heartbeat.  Restart the watchdog."""
        self.heard_at = self._clock.seconds()
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self.watchdog_timeout)
        else:
            self._watchdog = self._clock.callLater(self.watchdog_timeout, self._silent)

    def _silent(self) -> None:
        self._watchdog = None
        _log.warn(
            "Changes feed for {db} sent nothing for {seconds:g}s; reconnecting",
            db=self.db,
            seconds=self.watchdog_timeout,
        )
        if self._transport is not None:
            self._transport.stopProducing()

    def line(self, raw: bytes) -> None:
        raw = raw.strip()
        if not raw:
            return  # heartbeat
        try:
            change = json.loads(raw)
        except ValueError:
            _log.warn("Changes feed for {db} sent a line that is not JSON; reconnecting", db=self.db)
            if self._transport is not None:
                self._transport.stopProducing()
            return
        if not isinstance(change, dict):
            return
        if "seq" in change:
            self.last_seq = change["seq"]  # opaque: an integer (1.x) or a string (2.x+)
        docid = change.get("id")
        if isinstance(docid, str):
            self._on_change(self.db, docid)
            self._following.reported(change)  # after the eviction: the check may vouch now
        elif "last_seq" in change:
            self.last_seq = change["last_seq"]  # the server ends the feed; connectionLost follows

    def _gap(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._stop_checks()
        self.live = False
        self._on_gap(self.db)

    def _stop_checks(self) -> None:
        if self._next_check is not None and self._next_check.active():
            self._next_check.cancel()
        self._next_check = None
        checking, self._checking = self._checking, None
        if checking is not None:
            checking.cancel()
        self._confirmed_at = None

    def _schedule_retry(self) -> None:
        if not self.running or self._retry is not None:
            return
        delay = self._policy(self._attempt)
        self._attempt += 1
        self.reconnects += 1
        self._retry = self._clock.callLater(delay, self._connect)

    def _cancel_timers(self) -> None:
        for call in (self._retry, self._watchdog):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._watchdog = None


class FeedManager(MultiService):
    """The databases' own feeds, at most ``max_feeds`` (by default the least recently served go first)."""

    def __init__(
        self,
        client: CouchDBClient,
        clock: Any,
        *,
        max_feeds: int,
        heartbeat: float,
        policy: Callable[[int], float] | None = None,
        epochs: Iterator[int] | None = None,
    ) -> None:
        super().__init__()
        self._client = client
        self._clock = clock
        self.max_feeds = max_feeds
        self._heartbeat = heartbeat
        self._policy = policy
        self._epochs = epochs or itertools.count(1)
        self._feeds: OrderedDict[str, ChangesFeed] = OrderedDict()
        self._closing = 0  # stopped feeds whose connection is not closed yet
        self._waiting: str | None = None  # the database to follow once one of them has closed
        self.on_started: Callable[[str], None] = lambda db: None
        self._retired_reconnects = 0
        self.on_change: OnChange = lambda db, docid: None
        self.on_gap: OnGap = lambda db: None
        self.on_gone: OnGap = lambda db: None  # the feed found the database deleted

    def has(self, db: str) -> bool:
        return db in self._feeds

    def full(self) -> bool:
        """No room for another feed (feeds still closing their connection count too)."""
        return len(self._feeds) + self._closing >= self.max_feeds

    def live_epoch(self, db: str) -> int | None:
        """The live epoch of ``db``'s feed, if it has one that may be trusted now (never starts one)."""
        feed = self._feeds.get(db)
        return feed.epoch if feed is not None and feed.fresh() else None

    def served(self, db: str) -> None:
        """A token check in ``db`` passed: follow ``db``, before the databases served less recently.

        Only this starts a feed or moves one up, so requests that fail (names
        made up, wrong tokens) cost no feed and push none out.
        """
        feed = self._feeds.get(db)
        if feed is not None:
            self._feeds.move_to_end(db)
        elif self.running and self.max_feeds > 0:
            while len(self._feeds) >= self.max_feeds:  # (feeds still closing will make room themselves)
                oldest, _ = self._feeds.popitem(last=False)
                self._stop(oldest)
            if self.full():
                self._waiting = db  # a stopped feed still closes its connection: started once it has
            else:
                self._start(db)

    def coldest(self, score: Callable[[str], float]) -> str | None:
        """The followed database with the lowest ``score``."""
        return min(self._feeds, key=score, default=None)

    def stop(self, db: str) -> None:
        """Stop following ``db`` (its entries go with the feed)."""
        if self._feeds.pop(db, None) is not None:
            self._stop(db)

    def _start(self, db: str) -> ChangesFeed:
        self.on_started(db)
        feed = ChangesFeed(
            db,
            self._client,
            self._clock,
            heartbeat=self._heartbeat,
            on_change=self._changed,
            on_gap=self._gapped,
            on_gone=self._forget,
            policy=self._policy,
            epochs=self._epochs,
        )
        self._feeds[db] = feed
        feed.setServiceParent(self)
        return feed

    def _stop(self, db: str) -> None:
        feed = self.getServiceNamed(db) if db in self.namedServices else None
        if feed is not None:
            self._retired_reconnects += feed.reconnects
            closed = feed.connection_closed()
            feed.disownServiceParent()  # stops it, which drops its entries
            if not closed.called:  # its connection counts until it is gone: max_feeds is a hard bound
                self._closing += 1
                closed.addBoth(self._closed)

    def _closed(self, _: object) -> None:
        self._closing -= 1
        db, self._waiting = self._waiting, None
        if db is not None and db not in self._feeds and self.running and not self.full():
            self._start(db)

    def _changed(self, db: str, docid: str) -> None:
        self.on_change(db, docid)

    def _gapped(self, db: str) -> None:
        self.on_gap(db)

    def _forget(self, db: str) -> None:
        self._feeds.pop(db, None)
        self._stop(db)
        self.on_gone(db)

    def feeds(self) -> list[ChangesFeed]:
        return list(self._feeds.values())

    def connected(self) -> int:
        """How many feeds are live now."""
        return sum(1 for feed in self._feeds.values() if feed.live)

    @property
    def reconnects(self) -> int:
        """Reconnections of every feed so far, stopped ones included."""
        return self._retired_reconnects + sum(feed.reconnects for feed in self._feeds.values())
