"""ChangesFeed's watchdog, backoff and parsing, on a Clock: no real sleeps, no network.

The CouchDB client here is a fake that hands out controllable responses.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from couchtoken.upstream.client import UpstreamError
from couchtoken.upstream.feeds import ChangesFeed, FeedManager


class FakeTransport:
    disconnecting = False  # like twisted.web's TransportProxyProducer

    def __init__(self, protocol: Any, lingers: bool = False) -> None:
        self.protocol = protocol
        self.stopped = False
        self.lingers = lingers  # a connection that closes only when the test says so

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            if not self.lingers:
                self.close()

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionLost()))

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class FakeResponse:
    def __init__(self, code: int, lingers: bool = False) -> None:
        self.code = code
        self.lingers = lingers
        self.protocol: Any = None
        self.transport: FakeTransport | None = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport = FakeTransport(protocol, self.lingers)
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    """Each open_changes call waits for the test to answer it.

    ``ends_feeds`` says what kind of server it plays: True is CouchDB (feeds of a
    deleted database end), False is PouchDB Server (database checks run; each
    ``database_seq`` call waits for the test to answer it too).
    """

    def __init__(self, ends_feeds: bool = True) -> None:
        self.pending: list[Deferred] = []
        self.calls = 0
        self.ends_feeds = ends_feeds
        self.checks: list[Deferred] = []

    async def feeds_end_with_database(self) -> bool:
        return self.ends_feeds

    async def latest_change(self, db: str, timeout: float) -> Any:
        d: Deferred = Deferred()
        self.checks.append(d)
        return await d

    def check_answer(self, seq: Any) -> None:
        self.checks.pop(0).callback(seq)

    async def open_changes(self, db: str, heartbeat: float, timeout: float) -> Any:
        self.calls += 1
        d: Deferred = Deferred()
        self.pending.append(d)
        return await d

    def answer(self, code: int = 200, lingers: bool = False) -> FakeResponse:
        response = FakeResponse(code, lingers)
        self.pending.pop(0).callback(response)
        return response

    def fail(self) -> None:
        self.pending.pop(0).errback(UpstreamError("connect", "refused"))

    async def discard(self, response: Any) -> None:
        pass


class Events:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.gaps: list[str] = []
        self.gone: list[str] = []


def make_feed(policy=None, heartbeat: float = 1.0, ends_feeds: bool = True):
    clock, client, events = Clock(), FakeClient(ends_feeds), Events()
    feed = ChangesFeed(
        "db",
        client,  # type: ignore[arg-type]
        clock,
        heartbeat=heartbeat,
        on_change=lambda db, docid: events.changes.append((db, docid)),
        on_gap=events.gaps.append,
        on_gone=events.gone.append,
        policy=policy or backoffPolicy(initialDelay=1.0, maxDelay=8.0, factor=2.0, jitter=lambda: 0.0),
    )
    feed.startService()
    return feed, clock, client, events


def test_live_once_the_headers_arrive_and_changes_are_reported():
    feed, clock, client, events = make_feed()
    assert not feed.live
    response = client.answer()
    assert feed.live and feed.epoch == 1
    response.send(b'{"seq":5,"id":"a","changes":[{"rev":"1-x"}]}\n\n')
    response.send(b'{"seq":"6-g1AAAA","id":"b/c","deleted":true,"changes":[]}\n')
    assert events.changes == [("db", "a"), ("db", "b/c")]
    assert feed.last_seq == "6-g1AAAA"  # opaque: strings (2.x+) as well as integers (1.x)


def test_a_line_split_across_chunks_is_reassembled():
    feed, clock, client, events = make_feed()
    response = client.answer()
    response.send(b'{"seq":1,"id":"sp')
    response.send(b'lit"}\n')
    assert events.changes == [("db", "split")]


def test_the_watchdog_drops_a_silent_connection_and_reconnects():
    feed, clock, client, events = make_feed(heartbeat=1.0)
    response = client.answer()
    timeout = feed.watchdog_timeout
    assert timeout == 3.0
    clock.advance(timeout - 0.5)
    response.send(b"\n")  # a heartbeat resets the watchdog
    clock.advance(timeout - 0.5)
    assert feed.live and not response.transport.stopped
    clock.advance(0.6)
    assert response.transport.stopped
    assert not feed.live
    assert events.gaps == ["db"]
    assert client.calls == 1
    clock.advance(1.0)  # policy(0) == 1 s
    assert client.calls == 2
    client.answer()
    assert feed.live and feed.epoch == 2


def test_backoff_grows_and_is_capped():
    feed, clock, client, events = make_feed()
    delays = []
    for _ in range(6):
        client.fail()
        before = client.calls
        waited = 0.0
        while client.calls == before:
            clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_starts_over_after_a_live_period():
    feed, clock, client, events = make_feed()
    client.fail()
    clock.advance(1.0)
    client.fail()
    clock.advance(2.0)
    response = client.answer()
    response.end()  # the server closes the feed
    assert not feed.live and events.gaps == ["db"]
    calls = client.calls
    clock.advance(1.0)
    assert client.calls == calls + 1


def test_the_default_policy_is_jittered():
    delays = set()
    for _ in range(5):
        feed, clock, client, events = make_feed(policy=None)
        feed._policy = backoffPolicy(initialDelay=0.25, maxDelay=30.0, factor=2.0)
        delays.add(round(feed._policy(3), 6))
    assert len(delays) > 1
    assert all(2.0 <= d <= 3.0 for d in delays)


def test_a_404_means_the_database_is_gone():
    feed, clock, client, events = make_feed()
    client.answer(404)
    assert events.gone == ["db"]
    clock.advance(100)
    assert client.calls == 1


def test_other_statuses_retry():
    feed, clock, client, events = make_feed()
    client.answer(500)
    clock.advance(1.0)
    assert client.calls == 2


def test_a_line_that_is_not_json_reconnects():
    feed, clock, client, events = make_feed()
    response = client.answer()
    response.send(b"<html>proxy error</html>\n")
    assert response.transport.stopped and not feed.live


def test_stopping_closes_the_connection_and_never_reconnects():
    feed, clock, client, events = make_feed()
    response = client.answer()
    feed.stopService()
    assert response.transport.stopped
    assert not feed.live
    clock.advance(1000)
    assert client.calls == 1
    assert clock.getDelayedCalls() == []


def test_stopping_while_connecting_cancels_the_attempt():
    feed, clock, client, events = make_feed()
    pending = client.pending[0]
    feed.stopService()
    assert pending.called  # cancelled
    clock.advance(1000)
    assert client.calls == 1


def test_the_manager_bounds_feeds_and_reports_live_epochs():
    clock, client = Clock(), FakeClient()
    manager = FeedManager(client, clock, max_feeds=2, heartbeat=1.0)  # type: ignore[arg-type]
    gaps = []
    manager.on_gap = gaps.append
    manager.startService()
    manager.served("a")
    assert manager.live_epoch("a") is None  # started, not live yet
    client.answer()
    assert manager.live_epoch("a") == 1
    manager.served("b")
    client.answer()
    manager.served("a")  # a is now the most recently served
    manager.served("c")
    assert sorted(f.db for f in manager.feeds()) == ["a", "c"]
    assert "b" in gaps
    manager.stopService()
    assert manager.feeds() == [] or all(not f.running for f in manager.feeds())


def test_asking_for_an_epoch_neither_starts_a_feed_nor_moves_one_up():
    clock, client = Clock(), FakeClient()
    manager = FeedManager(client, clock, max_feeds=2, heartbeat=1.0)  # type: ignore[arg-type]
    manager.startService()
    assert manager.live_epoch("unknown") is None
    assert client.calls == 0
    manager.served("a")
    manager.served("b")
    for _ in range(10):
        manager.live_epoch("a")  # looked up (a miss, a failed check...), never served
    manager.served("c")
    assert sorted(f.db for f in manager.feeds()) == ["b", "c"]
    manager.stopService()


@pytest.mark.parametrize("max_feeds", [0])
def test_no_feeds_means_no_live_epoch(max_feeds):
    clock, client = Clock(), FakeClient()
    manager = FeedManager(client, clock, max_feeds=max_feeds, heartbeat=1.0)  # type: ignore[arg-type]
    manager.startService()
    manager.served("a")
    assert manager.live_epoch("a") is None
    assert client.calls == 0


def test_a_silent_feed_stops_vouching_for_its_entries_after_two_and_a_half_heartbeats():
    feed, clock, client, events = make_feed(heartbeat=1.0)
    response = client.answer()
    assert feed.fresh()
    clock.advance(2.4)
    assert feed.fresh(), "heard 2.4 heartbeats ago: still trusted"
    clock.advance(0.2)
    assert feed.live and not feed.fresh(), "silent for 2.6 heartbeats: the connection is open but not trusted"
    response.send(b"\n")  # a heartbeat
    assert feed.fresh()


def test_the_manager_gives_no_epoch_for_a_silent_feed():
    clock, client = Clock(), FakeClient()
    manager = FeedManager(client, clock, max_feeds=5, heartbeat=1.0)  # type: ignore[arg-type]
    manager.startService()
    manager.served("db")
    client.answer()
    assert manager.live_epoch("db") == 1
    clock.advance(2.6)
    assert manager.live_epoch("db") is None
    manager.stopService()


def test_on_couchdb_no_database_checks_run():
    feed, clock, client, events = make_feed()
    client.answer()
    clock.advance(10)
    assert client.checks == [] and feed.checks is False


def test_on_pouchdb_entries_wait_for_the_first_database_check():
    feed, clock, client, events = make_feed(ends_feeds=False)
    response = client.answer()
    assert feed.live and not feed.fresh(), "live, but not yet found following its database"
    client.check_answer({"seq": 4, "id": "a", "changes": [{"rev": "1-x"}]})
    assert feed.fresh()
    clock.advance(1.0)  # one heartbeat later: the next check
    response.send(b"\n")
    client.check_answer({"seq": 4, "id": "a", "changes": [{"rev": "1-x"}]})
    assert feed.fresh() and events.gaps == []


def test_on_pouchdb_a_check_that_gets_no_answer_lets_the_entries_lapse():
    feed, clock, client, events = make_feed(ends_feeds=False)
    response = client.answer()
    client.check_answer({"last_seq": 0})
    clock.advance(1.0)
    response.send(b"\n")
    assert len(client.checks) == 1  # asked, and no answer comes
    clock.advance(1.0)
    response.send(b"\n")
    assert feed.fresh()
    clock.advance(0.6)
    response.send(b"\n")
    assert feed.live and not feed.fresh(), "last found following 2.6 s ago"
    client.checks.pop(0).errback(UpstreamError("response_timeout", "slow"))
    clock.advance(1.0)
    client.check_answer({"last_seq": 0})
    assert feed.fresh()


def test_on_pouchdb_a_database_created_again_makes_the_feed_reconnect():
    feed, clock, client, events = make_feed(ends_feeds=False)
    response = client.answer()
    client.check_answer({"seq": 2, "id": "doc", "changes": [{"rev": "2-old"}]})
    clock.advance(1.0)
    client.check_answer({"seq": 2, "id": "doc", "changes": [{"rev": "2-new"}]})
    assert response.transport.stopped and not feed.live
    assert events.gaps == ["db"]
    clock.advance(1.0)  # policy(0) == 1 s
    assert client.calls == 2
    client.answer()
    assert feed.live and feed.epoch == 2 and not feed.fresh()


def test_on_pouchdb_a_change_the_feed_never_reports_makes_it_reconnect():
    feed, clock, client, events = make_feed(ends_feeds=False)
    response = client.answer()
    client.check_answer({"seq": 2, "id": "a", "changes": [{"rev": "1-x"}]})
    clock.advance(1.0)
    response.send(b'{"seq":3,"id":"b","changes":[{"rev":"1-y"}]}\n')  # reported: fine
    client.check_answer({"seq": 3, "id": "b", "changes": [{"rev": "1-y"}]})
    clock.advance(1.0)
    client.check_answer({"seq": 4, "id": "c", "changes": [{"rev": "1-z"}]})  # not reported (yet)
    assert feed.live
    clock.advance(1.0)
    client.check_answer({"seq": 4, "id": "c", "changes": [{"rev": "1-z"}]})  # still not reported
    assert not feed.live and events.gaps == ["db"]


def test_on_pouchdb_a_missing_database_stops_the_feed():
    feed, clock, client, events = make_feed(ends_feeds=False)
    client.answer()
    client.check_answer({"last_seq": 0})
    clock.advance(1.0)
    client.check_answer(None)  # 404
    assert events.gone == ["db"]


def test_on_pouchdb_stopping_cancels_the_check_in_flight():
    feed, clock, client, events = make_feed(ends_feeds=False)
    client.answer()
    pending = client.checks[0]
    feed.stopService()
    assert pending.called  # cancelled
    assert clock.getDelayedCalls() == []


def test_max_feeds_bounds_connections_even_while_a_stopped_feed_closes():
    clock, client = Clock(), FakeClient()
    manager = FeedManager(client, clock, max_feeds=1, heartbeat=1.0)  # type: ignore[arg-type]
    manager.startService()
    manager.served("a")
    first = client.answer(lingers=True)
    manager.served("b")  # a is stopped, but its connection is not closed yet
    assert first.transport.stopped
    assert client.calls == 1 and manager.full(), "b waits: two feed connections at once otherwise"
    first.transport.close()
    assert client.calls == 2 and [f.db for f in manager.feeds()] == ["b"]
    manager.stopService()
