"""DocumentCache's rules on a Clock, with a fake fetch and fake feed status."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock

from couchtoken.upstream.cache import DocumentCache
from couchtoken.upstream.client import UpstreamError

FIELD = ("download_token",)


class Feeds:
    """Feed status the test sets by hand: ``epoch`` for database "db", ``others`` for any other."""

    def __init__(self, epoch: int | None = 1) -> None:
        self.epoch = epoch
        self.others: int | None = None
        self.asked: list[str] = []
        self.served_dbs: list[str] = []

    def live_epoch(self, db: str) -> int | None:
        self.asked.append(db)
        return self.epoch if db == "db" else self.others

    def served(self, db: str) -> None:
        self.served_dbs.append(db)


class Fetches:
    """A fetch that waits for the test to answer; counts calls per key."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, str], list[Deferred]] = {}
        self.count = 0

    async def __call__(self, db: str, docid: str) -> Any:
        self.count += 1
        d: Deferred = Deferred()
        self.pending.setdefault((db, docid), []).append(d)
        return await d

    def answer(self, key=("db", "doc"), document: Any = None) -> None:
        if document is None:
            document = {"_id": key[1], "_rev": "1-a", "download_token": "t"}
        self.pending[key].pop(0).callback(document)


def make(
    maxsize: int = 100,
    ttl: float = 60.0,
    epoch: int | None = 1,
    max_bytes: int | None = None,
    fetch: Any = None,
):
    """A cache on a Clock; ``fetch`` (default: a ``Fetches``) is returned as the third item;
    ``max_bytes`` None keeps DocumentCache's default byte bound."""
    clock, fetches, feeds = Clock(), Fetches() if fetch is None else fetch, Feeds(epoch)
    byte_bound = {} if max_bytes is None else {"max_bytes": max_bytes}
    cache = DocumentCache(fetches, FIELD, feeds, clock, maxsize=maxsize, ttl=ttl, **byte_bound)
    return cache, clock, fetches, feeds


def lookup(cache: DocumentCache, docid: str = "doc") -> Deferred:
    """The summary a lookup gives (dropping whether it came from the cache)."""
    return ensureDeferred(cache.lookup("db", docid)).addCallback(lambda found: found[0])


def test_a_fetched_document_is_served_from_memory_afterwards():
    cache, clock, fetches, feeds = make()
    first = lookup(cache)
    fetches.answer()
    assert first.result.accepts(b"t")
    second = lookup(cache)
    assert second.called and second.result.accepts(b"t")
    assert fetches.count == 1
    assert (cache.hits, cache.misses) == (1, 1)


def test_entries_never_outlive_the_ttl():
    cache, clock, fetches, feeds = make(ttl=10)
    lookup(cache)
    fetches.answer()
    clock.advance(9.9)
    lookup(cache)
    assert fetches.count == 1
    clock.advance(0.2)
    lookup(cache)
    assert fetches.count == 2


@pytest.mark.parametrize(("maxsize", "lookups"), [(5, 50), (3, 10)])
def test_the_cache_never_exceeds_its_size(maxsize, lookups):
    """The entry bound holds under the byte bound too (``make`` keeps the default one)."""
    cache, clock, fetches, feeds = make(maxsize=maxsize)
    for i in range(lookups):
        lookup(cache, f"d{i}")
        fetches.answer(("db", f"d{i}"))
        assert len(cache) <= maxsize
    assert len(cache) == maxsize


def test_missing_documents_are_cached_too():
    cache, clock, fetches, feeds = make()
    lookup(cache)
    fetches.pending[("db", "doc")].pop(0).callback(None)
    again = lookup(cache)
    assert again.called and again.result is None
    assert fetches.count == 1


def test_concurrent_lookups_share_one_fetch():
    cache, clock, fetches, feeds = make()
    waiters = [lookup(cache) for _ in range(500)]
    assert fetches.count == 1
    fetches.answer()
    assert all(w.called and w.result.accepts(b"t") for w in waiters)


def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch():
    cache, clock, fetches, feeds = make()
    first, second = lookup(cache), lookup(cache)
    first.cancel()
    first.addErrback(lambda f: f.trap(CancelledError))
    fetches.answer()
    assert second.result.accepts(b"t")


def test_a_change_during_the_fetch_keeps_the_result_out_of_the_cache():
    cache, clock, fetches, feeds = make()
    waiting = lookup(cache)
    cache.evict("db", "doc")  # the feed reports a change while the GET is in flight
    fetches.answer()
    assert waiting.result.accepts(b"t")  # the waiting request still gets an answer
    lookup(cache)
    assert fetches.count == 2


def test_a_feed_gap_during_the_fetch_keeps_the_result_out_of_the_cache():
    cache, clock, fetches, feeds = make(epoch=1)
    lookup(cache)
    feeds.epoch = 2  # the feed reconnected meanwhile
    fetches.answer()
    lookup(cache)
    assert fetches.count == 2


def test_nothing_is_stored_or_served_while_the_feed_is_not_live():
    cache, clock, fetches, feeds = make(epoch=None)
    lookup(cache)
    fetches.answer()
    lookup(cache)
    assert fetches.count == 2
    fetches.answer()
    feeds.epoch = 3
    lookup(cache)
    fetches.answer()
    lookup(cache)
    assert fetches.count == 3


def test_entries_from_an_older_epoch_are_not_used():
    cache, clock, fetches, feeds = make(epoch=1)
    lookup(cache)
    fetches.answer()
    feeds.epoch = 2
    lookup(cache)
    assert fetches.count == 2


def test_dropping_a_database_forgets_its_documents_and_spoils_its_fetches():
    cache, clock, fetches, feeds = make()
    lookup(cache, "a")
    fetches.answer(("db", "a"))
    lookup(cache, "b")
    cache.drop_database("db")
    fetches.answer(("db", "b"))
    assert len(cache) == 0


def test_errors_reach_every_waiter_and_are_not_cached():
    cache, clock, fetches, feeds = make()
    waiters = [lookup(cache) for _ in range(3)]
    fetches.pending[("db", "doc")].pop(0).errback(UpstreamError("connect", "refused"))
    for waiter in waiters:
        assert isinstance(waiter.result.value, UpstreamError)
        waiter.addErrback(lambda f: None)
    lookup(cache)
    assert fetches.count == 2
    fetches.answer()


@pytest.mark.parametrize("bound", [{"maxsize": 0}, {"max_bytes": 0}], ids=["zero-entries", "zero-bytes"])
def test_a_zero_size_cache_is_off_and_stores_nothing(bound):
    cache, clock, fetches, feeds = make(**bound)
    assert not cache.enabled
    lookup(cache)
    fetches.answer()
    lookup(cache)
    assert fetches.count == 2


def test_summaries_hide_tokens_in_repr():
    cache, clock, fetches, feeds = make()
    result = lookup(cache)
    fetches.answer(document={"_rev": "1-a", "download_token": "super-secret"})
    assert "super-secret" not in repr(result.result)


def test_counters_and_the_cached_flag():
    cache, clock, fetches, feeds = make()
    first = ensureDeferred(cache.lookup("db", "doc"))
    fetches.answer()
    assert first.result[1] is False
    second = ensureDeferred(cache.lookup("db", "doc"))
    assert second.result[1] is True
    ensureDeferred(cache.lookup("db", "doc"))
    assert (cache.hits, cache.misses) == (2, 1)
    assert (cache.evictions, cache.revocations) == (0, 0)
    cache.evict("db", "doc")
    cache.evict("db", "doc")  # already gone: not counted twice
    cache.evict("db", "never-cached")
    assert (cache.evictions, cache.revocations) == (1, 1)
    lookup(cache)
    fetches.answer()
    assert cache.misses == 2
    cache.evict("db", "doc")
    assert (cache.evictions, cache.revocations) == (2, 2)
    for docid in ("a", "b"):
        lookup(cache, docid)
        fetches.answer(("db", docid))
    cache.drop_database("db")
    assert (cache.evictions, cache.revocations) == (4, 2)
    assert len(cache) == 0


def test_each_database_has_its_own_feed_status():
    cache, clock, fetches, feeds = make(epoch=1)
    feeds.others = None  # database "other" has no live feed
    ensureDeferred(cache.lookup("other", "doc"))
    fetches.answer(("other", "doc"))
    ensureDeferred(cache.lookup("other", "doc"))
    assert fetches.count == 2  # nothing stored for "other"
    assert "other" in feeds.asked
    lookup(cache)
    fetches.answer()
    lookup(cache)
    assert fetches.count == 3  # "db" is cached
    cache.drop_database("other")
    assert len(cache) == 1


def test_a_disabled_cache_never_starts_feeds_and_evicts_quietly():
    cache, clock, fetches, feeds = make(maxsize=0)
    lookup(cache)
    fetches.answer()
    assert feeds.asked == []
    assert len(cache) == 0
    cache.evict("db", "doc")
    cache.drop_database("db")


def test_a_one_entry_cache_works():
    cache, clock, fetches, feeds = make(maxsize=1)
    assert cache.enabled
    lookup(cache)
    fetches.answer()
    lookup(cache)
    assert fetches.count == 1


def test_a_fetch_that_fails_at_once_fails_its_lookup_instead_of_hanging():
    async def failing_at_once(db: str, docid: str) -> Any:
        raise UpstreamError("connect", "refused before any wait")

    cache, *_ = make(fetch=failing_at_once)
    failed = lookup(cache)
    assert failed.called, "the lookup hangs"
    assert isinstance(failed.result.value, UpstreamError)
    failed.addErrback(lambda failure: None)
    assert cache._flights == {}


def test_a_fetch_that_answers_at_once_answers_its_lookup():
    async def answering_at_once(db: str, docid: str) -> Any:
        return {"_id": docid, "_rev": "1-a", "download_token": "t"}

    cache, *_ = make(fetch=answering_at_once)
    found = lookup(cache)
    assert found.called and found.result.accepts(b"t")


def test_a_passed_check_asks_the_feeds_to_follow_its_database():
    cache, clock, fetches, feeds = make()
    cache.served("db")
    assert feeds.served_dbs == ["db"]


def test_a_disabled_cache_follows_nothing():
    cache, clock, fetches, feeds = make(maxsize=0)
    cache.served("db")
    assert feeds.served_dbs == []


def big_document(docid: str, attachments: int) -> dict:
    stubs = {
        f"a{i}": {"content_type": "image/png", "digest": "md5-x", "length": i} for i in range(attachments)
    }
    return {"_id": docid, "_rev": "1-a", "download_token": "t", "_attachments": stubs}


def test_the_cache_never_holds_more_bytes_than_its_bound():
    cache, clock, fetches, feeds = make(maxsize=1000, max_bytes=200_000)
    for i in range(20):
        lookup(cache, f"d{i}")
        fetches.answer(("db", f"d{i}"), big_document(f"d{i}", 200))  # ~60 kB each
        assert cache.bytes_held <= 200_000
    assert 1 <= len(cache) <= 4
    again = lookup(cache, "d19")
    assert again.called, "the newest is kept"


def test_an_entry_larger_than_the_whole_bound_is_not_kept():
    cache, clock, fetches, feeds = make(maxsize=1000, max_bytes=10_000)
    first = lookup(cache)
    fetches.answer(("db", "doc"), big_document("doc", 500))
    assert first.result.accepts(b"t")  # answered, just not kept
    assert len(cache) == 0 and cache.bytes_held == 0
    lookup(cache)
    assert fetches.count == 2


def test_the_cache_counts_the_bytes_of_each_entry():
    """Key strings, a fixed overhead and the summary's own size; a missing document costs a little."""
    import sys

    cache, clock, fetches, feeds = make()
    found = lookup(cache, "doc")
    fetches.answer(("db", "doc"))
    keys = sys.getsizeof("db") + sys.getsizeof("doc")
    assert cache.bytes_held == 600 + keys + found.result.size
    missing = lookup(cache, "gone")
    fetches.pending[("db", "gone")].pop(0).callback(None)
    assert missing.result is None
    assert (
        cache.bytes_held
        == 600 + keys + found.result.size + 600 + sys.getsizeof("db") + sys.getsizeof("gone") + 100
    )
    cache.drop_database("db")
    assert cache.bytes_held == 0
