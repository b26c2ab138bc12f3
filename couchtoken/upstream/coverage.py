"""Which feed vouches for a database's cached checks: a feed of its own, or the global feed.

Three modes, shown in ``/_health``:

``global``
    CouchDB offers ``/_db_updates``: one global feed covers every database
    (see ``couchtoken.upstream.global_feed``).  The *hot* databases, those
    with the most passed token checks lately (a decayed count of at least
    ``HOT_SCORE``, about one a second), get a ``_changes`` feed of their own
    as well, for the lowest revocation latency: at most ``max_feeds``, a
    hotter database taking the place of one less than half as hot.
``per-database``
    The server offers no ``/_db_updates`` (PouchDB Server, or a CouchDB
    without ``_global_changes``, or credentials that are no server admin's):
    every database where a check passed gets a feed of its own, at most
    ``max_feeds``, the least recently served going first.  Said once in the
    log.
``starting``
    Not known yet (the global feed has not answered): as ``per-database``;
    once the global feed is live, the databases that are not hot lose their
    own feed.

Only a passed token check covers a database or moves it up, so requests
that fail (made-up names, wrong tokens) cost CouchDB nothing and push
nothing out.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache
from twisted.application.service import MultiService
from twisted.logger import Logger

from couchtoken.upstream.client import CouchDBClient
from couchtoken.upstream.feeds import ChangesFeed, FeedManager, OnChange, OnGap
from couchtoken.upstream.global_feed import GlobalCoverage, GlobalFeed, OnDrop

_log = Logger()

HOT_SCORE = 10.0  # passed checks, decayed with HOT_SECONDS: about one a second, sustained
HOT_SECONDS = 10.0


class Hotness:
    """Exponentially decayed counts of passed checks per database (time constant ``seconds``)."""

    def __init__(self, clock: Any, seconds: float = HOT_SECONDS, max_databases: int = 100_000) -> None:
        self._clock = clock
        self._seconds = seconds
        self._scores: LRUCache[str, tuple[float, float]] = LRUCache(maxsize=max_databases)

    def score(self, db: str) -> float:
        found = self._scores.get(db)
        if found is None:
            return 0.0
        value, at = found
        return value * math.exp(-(self._clock.seconds() - at) / self._seconds)

    def hit(self, db: str) -> float:
        """Count a passed check in ``db``; returns its new score."""
        value = self.score(db) + 1.0
        self._scores[db] = (value, self._clock.seconds())
        return value


class Coverage(MultiService):
    """The feeds of a running couchtoken: own feeds for some databases, the global feed for the rest."""

    def __init__(
        self,
        client: CouchDBClient,
        clock: Any,
        *,
        max_feeds: int,
        heartbeat: float,
        max_databases: int,
        use_global: bool = True,
        policy: Callable[[int], float] | None = None,
        hot_score: float = HOT_SCORE,
    ) -> None:
        super().__init__()
        epochs = itertools.count(1)  # shared: an epoch never repeats, whichever feed it comes from
        self.own = FeedManager(
            client, clock, max_feeds=max_feeds, heartbeat=heartbeat, policy=policy, epochs=epochs
        )
        self.own.on_change = self._changed
        self.own.on_gap = self._gapped
        self.own.on_started = self._own_feed_started
        self.own.on_gone = self._gone
        self.own.setServiceParent(self)
        self.global_feed: GlobalFeed | None = None
        self.covered: GlobalCoverage | None = None
        if use_global:
            self.global_feed = GlobalFeed(
                client,
                clock,
                heartbeat=heartbeat,
                on_event=self._event,
                on_gap=self._global_gap,
                on_gone=self._no_global,
                policy=policy,
                epochs=epochs,
            )
            self.global_feed.on_live = self._global_live
            self.global_feed.setServiceParent(self)
            self.covered = GlobalCoverage(
                client,
                self.global_feed,
                on_change=self._changed,
                on_drop=self._dropped,
                max_databases=max_databases,
            )
        self.hotness = Hotness(clock)
        self._hot_score = hot_score
        self._refused = not use_global
        self.on_change: OnChange = lambda db, docid: None
        self.on_gap: OnGap = lambda db: None  # one database's entries (and bodies) must go
        self.on_drop: OnDrop = lambda dbs: None  # these databases' entries (and bodies) must go
        self.on_gone: OnGap = lambda db: None  # the database was deleted: its disk files are of no use

    @property
    def mode(self) -> str:
        if self._refused or self.global_feed is None:
            return "per-database"
        return "global" if self.global_feed.epoch else "starting"

    def live_epoch(self, db: str) -> int | None:
        """The epoch of the feed that vouches for ``db``'s entries now, if any."""
        if self.own.has(db):
            return self.own.live_epoch(db)
        if self.covered is not None and self.mode == "global":
            return self.covered.live_epoch(db)
        return None

    def served(self, db: str) -> None:
        """A token check in ``db`` passed: cover ``db`` (and count it towards its own feed)."""
        score = self.hotness.hit(db)
        if self.mode != "global" or self.covered is None:
            self.own.served(db)
            return
        if self.own.has(db):
            self.own.served(db)
            return
        if score >= self._hot_score and self.running and self.own.max_feeds > 0:
            victim = self.own.coldest(self.hotness.score) if self.own.full() else None
            if victim is None or 2 * self.hotness.score(victim) < score:
                if victim is not None:
                    self.own.stop(victim)  # back under the global feed at its next passed check
                self.own.served(db)  # starts its feed now, or once the victim's connection is closed
                if self.own.has(db):
                    return
        self.covered.cover(db)

    def stopService(self) -> Any:
        if self.covered is not None:
            self.covered.stop()
        return super().stopService()

    def _changed(self, db: str, docid: str) -> None:
        self.on_change(db, docid)

    def _gapped(self, db: str) -> None:
        self.on_gap(db)

    def _own_feed_started(self, db: str) -> None:
        if self.covered is not None and self.mode == "global":
            self.covered.forget(db)
            self.on_drop({db})  # its entries belong to the global feed's epoch: they would not be used

    def _dropped(self, dbs: set[str]) -> None:
        self.on_drop(dbs)

    def _gone(self, db: str) -> None:
        self.on_gone(db)

    def _event(self, db: str, kind: str) -> None:
        if kind == "deleted":
            self.on_gone(db)
        if self.covered is not None and not self.own.has(db):
            self.covered.event(db, kind)

    def _global_live(self) -> None:
        """The global feed is live (again): the databases that are not hot need no feed of their own."""
        for feed in self.own.feeds():
            if self.hotness.score(feed.db) < self._hot_score:
                self.own.stop(feed.db)

    def _global_gap(self, name: str) -> None:
        if self.covered is not None:
            self.covered.gap()

    def _no_global(self, name: str) -> None:
        if not self._refused:
            self._refused = True
            _log.info(
                "CouchDB offers no /_db_updates feed to these credentials: each database is followed "
                "by a _changes feed of its own (at most --max-feeds)"
            )
        if self.global_feed is not None and self.global_feed.parent is not None:
            self.global_feed.disownServiceParent()

    def feeds(self) -> list[ChangesFeed]:
        """The databases' own feeds (not the global one)."""
        return self.own.feeds()

    def connected(self) -> int:
        """Feeds live now, the global one included."""
        return self.own.connected() + (1 if self.global_feed is not None and self.global_feed.live else 0)

    @property
    def reconnects(self) -> int:
        extra = self.global_feed.reconnects if self.global_feed is not None else 0
        return self.own.reconnects + extra

    def details(self) -> dict[str, Any]:
        """For ``/_health``: the mode, and how many feeds there are and how many databases are covered."""
        found: dict[str, Any] = {
            "mode": self.mode,
            "connected": self.connected(),
            "total": len(self.own.feeds()) + (1 if self.mode == "global" else 0),
        }
        if self.mode == "global" and self.covered is not None:
            found["covered"] = len(self.covered)
        return found
