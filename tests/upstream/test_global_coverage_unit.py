"""GlobalCoverage's rules with a fake client and a fake global feed: baselines, catch-ups, gaps."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from couchtoken.upstream.client import UpstreamError
from couchtoken.upstream.coverage import Hotness
from couchtoken.upstream.global_feed import GlobalCoverage


class Feed:
    def __init__(self) -> None:
        self.live = True
        self.epoch = 7

    def fresh(self) -> bool:
        return self.live


class Client:
    """Each read waits for the test to answer it."""

    def __init__(self) -> None:
        self.baselines: list[tuple[str, Deferred]] = []
        self.catch_ups: list[tuple[str, Any, Deferred]] = []

    async def database_update_seq(self, db: str) -> Any:
        d: Deferred = Deferred()
        self.baselines.append((db, d))
        return await d

    async def changes_since(self, db: str, since: Any, limit: int) -> Any:
        d: Deferred = Deferred()
        self.catch_ups.append((db, since, d))
        return await d


def make():
    feed, client = Feed(), Client()
    evicted: list[tuple[str, str]] = []
    dropped: list[set[str]] = []
    coverage = GlobalCoverage(
        client,  # type: ignore[arg-type]
        feed,  # type: ignore[arg-type]
        on_change=lambda db, docid: evicted.append((db, docid)),
        on_drop=dropped.append,
        max_databases=100,
    )
    return coverage, feed, client, evicted, dropped


def covered(coverage, client, db="db", seq="5-x"):
    coverage.cover(db)
    client.baselines.pop(0)[1].callback(seq)
    assert coverage.live_epoch(db) == 7


def test_a_database_is_covered_once_its_baseline_is_read():
    coverage, feed, client, evicted, dropped = make()
    coverage.cover("db")
    assert coverage.live_epoch("db") is None, "no baseline yet"
    coverage.cover("db")
    assert len(client.baselines) == 1, "one baseline read per database"
    client.baselines.pop(0)[1].callback("5-x")
    assert coverage.live_epoch("db") == 7
    assert coverage.live_epoch("other") is None


def test_an_update_is_read_from_the_baseline_and_evicts_exactly_what_changed():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client)
    coverage.event("db", "updated")
    assert coverage.live_epoch("db") is None, "an update is waiting to be read"
    db, since, answer = client.catch_ups.pop(0)
    assert (db, since) == ("db", "5-x")
    answer.callback((["a", "b"], "7-y", False))
    assert evicted == [("db", "a"), ("db", "b")]
    assert coverage.live_epoch("db") == 7
    coverage.event("db", "updated")
    assert client.catch_ups.pop(0)[1] == "7-y", "the baseline moved on"


def test_updates_during_a_catch_up_are_read_by_one_more_read_not_two_at_once():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client)
    coverage.event("db", "updated")
    coverage.event("db", "updated")
    coverage.event("db", "updated")
    assert len(client.catch_ups) == 1, "single flight"
    client.catch_ups.pop(0)[2].callback((["a"], "6-y", False))
    assert len(client.catch_ups) == 1 and coverage.live_epoch("db") is None
    client.catch_ups.pop(0)[2].callback(([], "6-y", False))
    assert coverage.live_epoch("db") == 7


def test_a_long_catch_up_reads_page_after_page():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client)
    coverage.event("db", "updated")
    client.catch_ups.pop(0)[2].callback((["a"], "6-y", True))
    assert client.catch_ups[0][1] == "6-y"
    client.catch_ups.pop(0)[2].callback((["b"], "7-z", False))
    assert evicted == [("db", "a"), ("db", "b")] and coverage.live_epoch("db") == 7


def test_an_update_while_the_baseline_is_read_is_caught_up_after_it():
    coverage, feed, client, evicted, dropped = make()
    coverage.cover("db")
    coverage.event("db", "updated")
    client.baselines.pop(0)[1].callback("5-x")
    assert coverage.live_epoch("db") is None
    client.catch_ups.pop(0)[2].callback((["a"], "6-y", False))
    assert coverage.live_epoch("db") == 7


def test_deletion_and_creation_drop_the_database():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client)
    coverage.event("db", "deleted")
    assert dropped == [{"db"}] and coverage.live_epoch("db") is None
    coverage.event("other", "created")
    assert dropped[-1] == {"other"}


def test_a_failed_catch_up_drops_the_database():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client)
    coverage.event("db", "updated")
    client.catch_ups.pop(0)[2].errback(UpstreamError("status", "CouchDB answered 500"))
    assert dropped == [{"db"}] and coverage.live_epoch("db") is None


def test_a_gap_forgets_every_baseline():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client, "a")
    covered(coverage, client, "b")
    feed.live = False
    coverage.gap()
    assert dropped == [{"a", "b"}]
    feed.live, feed.epoch = True, 8
    assert coverage.live_epoch("a") is None
    coverage.cover("a")
    assert client.baselines[0][0] == "a", "learnt again in the new epoch"


def test_nothing_is_vouched_for_while_the_feed_is_not_fresh():
    coverage, feed, client, evicted, dropped = make()
    covered(coverage, client)
    feed.live = False
    assert coverage.live_epoch("db") is None
    coverage.cover("other")
    assert client.baselines == [], "no baseline read without a live feed"


def test_hotness_decays():
    clock = Clock()
    hotness = Hotness(clock, seconds=10)
    for _ in range(10):
        hotness.hit("db")
    assert 9.9 < hotness.score("db") <= 10
    clock.advance(10)
    assert 3.6 < hotness.score("db") < 3.7
    assert hotness.score("cold") == 0


class FeedClient:
    """Feeds (own and global) that wait for the test to answer them."""

    def __init__(self) -> None:
        self.own: dict[str, list[Deferred]] = {}
        self.global_feed: list[Deferred] = []

    async def feeds_end_with_database(self) -> bool:
        return True

    async def open_changes(self, db: str, heartbeat: float, timeout: float) -> Any:
        d: Deferred = Deferred()
        self.own.setdefault(db, []).append(d)
        return await d

    async def open_db_updates(self, heartbeat: float, timeout: float) -> Any:
        d: Deferred = Deferred()
        self.global_feed.append(d)
        return await d

    async def database_update_seq(self, db: str) -> Any:
        return "1-a"


class Response:
    code = 200

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(Transport(protocol))


class Transport:
    disconnecting = False

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def stopProducing(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionLost()))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def test_feeds_started_before_the_global_feed_answered_go_unless_hot():
    from couchtoken.upstream.coverage import Coverage

    clock, client = Clock(), FeedClient()
    coverage = Coverage(client, clock, max_feeds=10, heartbeat=1.0, max_databases=100)  # type: ignore[arg-type]
    coverage.startService()
    assert coverage.mode == "starting"
    coverage.served("cold")  # as per-database meanwhile: a feed of its own
    for _ in range(12):
        coverage.served("hot")
    assert sorted(f.db for f in coverage.feeds()) == ["cold", "hot"]
    client.global_feed.pop(0).callback(Response())
    assert coverage.mode == "global"
    assert [f.db for f in coverage.feeds()] == ["hot"], "the cold database is left to the global feed"
    coverage.served("cold")
    assert [f.db for f in coverage.feeds()] == ["hot"] and coverage.live_epoch("cold") is not None
    coverage.stopService()
