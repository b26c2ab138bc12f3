"""Document summaries cached by (database, document id), kept fresh by ``_changes`` feeds.

The safety invariant
--------------------
A cached answer is used only while its database's feed is live and has been
live without a gap since the entry was stored.  Concretely:

- an entry records the feed *epoch* (which connection of the feed) current
  when its fetch started, and is stored only if that feed was live then and
  is still live in the same epoch when the fetch completes;
- an entry is used only while its feed is live in that same epoch;
- a change for a document whose fetch is in flight marks the fetch stale: its
  result answers the requests that were waiting, but is not stored;
- when a feed loses its connection, every entry of its database is dropped.

So a token changed while a feed was down (an outage, a restart) can never be
honoured from the cache: until the feed is live again, checks go to CouchDB.
The TTL is only a safety net on top of this.

Concurrent lookups of a cold document share one fetch (single flight); a
waiter that is cancelled (its client left) does not cancel the fetch.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
from cachetools import TTLCache
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from couchtoken.access.documents import DocumentSummary

Key = tuple[str, str]
Fetch = Callable[[str, str], Awaitable[dict[str, Any] | None]]


class FeedStatus(Protocol):
    """What the cache asks of the feeds: is this database's feed live, in which epoch."""

    def live_epoch(self, db: str) -> int | None: ...

    def served(self, db: str) -> None: ...


@attrs.frozen
class _Entry:
    summary: DocumentSummary | None  # None: the document (or database) is missing
    epoch: int
    size: int  # bytes held: the summary, the key's strings and the cache's own bookkeeping


# What the TTLCache keeps per entry besides the key's strings and the summary (measured: ~480).
ENTRY_BYTES = 600
NO_SUMMARY_BYTES = 100


def _entry_size(key: Key, summary: DocumentSummary | None) -> int:
    held = summary.size if summary is not None else NO_SUMMARY_BYTES
    return ENTRY_BYTES + sys.getsizeof(key[0]) + sys.getsizeof(key[1]) + held


class _Entries(TTLCache[Key, _Entry]):
    """A TTL cache bounded in bytes (``max_bytes``) and, on top, in entries (``max_entries``).

    cachetools bounds one measure; the entry bound is kept here by making room
    (least recently used first) before a new key goes in.  An entry larger
    than the whole byte bound is not kept at all.
    """

    def __init__(self, max_entries: int, max_bytes: int, ttl: float, timer: Callable[[], float]) -> None:
        super().__init__(maxsize=max_bytes, ttl=ttl, timer=timer, getsizeof=lambda entry: entry.size)
        self.max_entries = max_entries

    def __setitem__(self, key: Key, value: _Entry) -> None:  # type: ignore[override]
        if value.size > self.maxsize:
            self.pop(key, None)
            return
        if key not in self:
            while len(self) >= self.max_entries:
                self.popitem()
        super().__setitem__(key, value)


@attrs.define
class _Flight:
    epoch: int | None
    waiters: list[Deferred] = attrs.Factory(list)
    stale: bool = False


class DocumentCache:
    """Answers "what does document (db, id) look like" from memory when it safely can."""

    def __init__(
        self,
        fetch: Fetch,
        token_field: Sequence[str],
        feeds: FeedStatus | None,
        clock: Any,
        *,
        maxsize: int,
        ttl: float,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._fetch = fetch
        self._token_field = tuple(token_field)
        self._feeds = feeds
        self._entries: _Entries | None = None
        if maxsize > 0 and max_bytes > 0 and feeds is not None:
            self._entries = _Entries(maxsize, max_bytes, ttl, clock.seconds)
        self._flights: dict[Key, _Flight] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.revocations = 0

    @property
    def enabled(self) -> bool:
        return self._entries is not None

    def __len__(self) -> int:
        return 0 if self._entries is None else len(self._entries)

    @property
    def bytes_held(self) -> int:
        """Bytes the entries hold (an estimate that errs high)."""
        return 0 if self._entries is None else int(self._entries.currsize)

    async def lookup(self, db: str, docid: str) -> tuple[DocumentSummary | None, bool]:
        """The document's summary (None: the document or database is missing), and whether it was cached."""
        key = (db, docid)
        epoch = self._feeds.live_epoch(db) if self.enabled and self._feeds is not None else None
        if self._entries is not None and epoch is not None:
            entry = self._entries.get(key)
            if entry is not None and entry.epoch == epoch:
                self.hits += 1
                return entry.summary, True
        self.misses += 1
        waiter: Deferred[DocumentSummary | None] = Deferred()
        flight = self._flights.get(key)
        if flight is not None:
            flight.waiters.append(waiter)
        else:
            flight = self._flights[key] = _Flight(epoch=epoch, waiters=[waiter])
            self._take_off(key, flight)  # may land at once: the waiter is on board already
        return await waiter, False

    def _take_off(self, key: Key, flight: _Flight) -> None:
        fetched = Deferred.fromCoroutine(self._fetch(*key))
        fetched.addCallback(self._summarize)
        fetched.addBoth(self._land, key, flight)

    def _summarize(self, document: dict[str, Any] | None) -> DocumentSummary | None:
        return None if document is None else DocumentSummary.from_document(document, self._token_field)

    def _land(self, result: DocumentSummary | None | Failure, key: Key, flight: _Flight) -> None:
        del self._flights[key]
        if not isinstance(result, Failure):
            self._store(key, flight, result)
        for waiter in flight.waiters:
            if not waiter.called:  # a cancelled waiter has been called already
                waiter.callback(result)  # a Failure here errbacks the waiter

    def _store(self, key: Key, flight: _Flight, summary: DocumentSummary | None) -> None:
        if self._entries is None or self._feeds is None or flight.stale or flight.epoch is None:
            return
        if self._feeds.live_epoch(key[0]) != flight.epoch:
            return  # the feed had a gap while we fetched
        self._entries[key] = _Entry(summary=summary, epoch=flight.epoch, size=_entry_size(key, summary))

    def served(self, db: str) -> None:
        """A token check in ``db`` passed: its documents are worth following (and caching)."""
        if self.enabled and self._feeds is not None:
            self._feeds.served(db)

    def evict(self, db: str, docid: str) -> None:
        """A change for this document arrived: forget it, and do not store a fetch in flight."""
        key = (db, docid)
        flight = self._flights.get(key)
        if flight is not None:
            flight.stale = True
        if self._entries is not None and self._entries.pop(key, None) is not None:
            self.evictions += 1
            self.revocations += 1

    def drop_database(self, db: str) -> None:
        """The database's feed had a gap (or stopped): forget all its documents."""
        self.drop_databases({db})

    def drop_databases(self, dbs: set[str]) -> None:
        """Forget every document of these databases (one pass over the cache, however many)."""
        if not dbs:
            return
        for flight_key, flight in self._flights.items():
            if flight_key[0] in dbs:
                flight.stale = True
        if self._entries is not None:
            for key in [k for k in self._entries.keys() if k[0] in dbs]:
                if self._entries.pop(key, None) is not None:
                    self.evictions += 1
