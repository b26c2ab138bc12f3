"""The ``--workers`` supervisor on a fake reactor and clock, and the metrics sum (no processes)."""

from __future__ import annotations

import json
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from couchtoken.ops.gather import MetricsSum, parse
from couchtoken.ops.settings import Settings
from couchtoken.ops.worker import Assignment, share_of, worker_settings
from couchtoken.ops.workers import RESTART_BACKOFF, SPARE_AFTER, STABLE_AFTER, Supervisor, twist_arguments
from couchtoken.upstream.server import CouchDBCluster


class FakeProcess:
    """What ``spawnProcess`` returns: records what the supervisor writes and signals."""

    def __init__(self, pid: int, protocol) -> None:
        self.pid = pid
        self.protocol = protocol
        self.written = b""
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.protocol.processEnded(reason)

    @property
    def assignment(self) -> Assignment | None:
        return Assignment.decode(self.written) if self.written else None


class FakeReactor:
    def __init__(self) -> None:
        self.spawned: list[FakeProcess] = []
        self.child_fds: list[dict] = []

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        process = FakeProcess(1000 + len(self.spawned), protocol)
        protocol.makeConnection(process)
        self.spawned.append(process)
        self.child_fds.append(childFDs)
        return process


KILLED = Failure(ProcessTerminated(signal=9))
CLEAN = Failure(ProcessDone(0))


@pytest.fixture
def supervisor(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    reactor, clock = FakeReactor(), Clock()
    public = [socket.socket(), socket.socket()]
    supervisor = Supervisor(reactor, 2, ["python", "-m", "twisted"], drain_timeout=5, clock=clock)
    supervisor.ports_ready([s.fileno() for s in public])
    supervisor.startService()
    yield supervisor, reactor, clock
    for s in public:
        s.close()


def workers_of(supervisor):
    return {slot.index: slot.pid for slot in supervisor.slots}


def test_starts_n_workers_each_told_its_own_sockets_and_a_spare(supervisor):
    supervisor, reactor, clock = supervisor
    assert len(reactor.spawned) == 3
    first, second, spare = reactor.spawned
    assert spare.assignment is None, "the spare waits"
    assert (first.assignment.slot, second.assignment.slot) == (0, 1)
    assert first.assignment.public_fd != second.assignment.public_fd  # one SO_REUSEPORT socket each
    assert first.assignment.ops_fd != second.assignment.ops_fd
    fds = reactor.child_fds[0]
    assert set(first.assignment.inherited) == {fd for fd in fds if fd >= 3}
    assert fds[0] == "w" and fds[1] == 1 and fds[2] == 2
    assert workers_of(supervisor) == {0: first.pid, 1: second.pid}


def test_a_dead_worker_is_replaced_by_the_spare_at_once_and_a_new_spare_started(supervisor):
    supervisor, reactor, clock = supervisor
    first, _, spare = reactor.spawned
    first.end(KILLED)
    clock.advance(0)
    assert spare.assignment.slot == 0
    assert workers_of(supervisor)[0] == spare.pid
    assert len(reactor.spawned) == 3, "the next spare waits for the new worker to start"
    clock.advance(SPARE_AFTER)
    assert len(reactor.spawned) == 4 and reactor.spawned[3].assignment is None
    assert supervisor.slots[0].restarts == 1


def test_a_worker_that_keeps_dying_is_replaced_with_growing_delays(supervisor):
    supervisor, reactor, clock = supervisor
    delays = []
    for _ in range(4):
        current = next(p for p in reactor.spawned if p.pid == workers_of(supervisor)[0])
        current.end(KILLED)
        waited = 0.0
        while workers_of(supervisor)[0] is None:
            clock.advance(0.05)
            waited += 0.05
        delays.append(waited)
    assert delays[0] <= 0.05
    assert delays[1] < delays[2] < delays[3]
    assert delays[3] >= RESTART_BACKOFF(2) - 0.2 - 0.05


def test_a_worker_that_ran_a_while_is_replaced_at_once_again(supervisor):
    supervisor, reactor, clock = supervisor
    for _ in range(3):
        current = next(p for p in reactor.spawned if p.pid == workers_of(supervisor)[0])
        current.end(KILLED)
        clock.advance(60)
    clock.advance(STABLE_AFTER + 1)
    current = next(p for p in reactor.spawned if p.pid == workers_of(supervisor)[0])
    current.end(KILLED)
    clock.advance(0)
    assert workers_of(supervisor)[0] is not None


def test_stopping_signals_every_worker_waits_for_them_and_kills_stragglers(supervisor):
    supervisor, reactor, clock = supervisor
    first, second, spare = reactor.spawned
    stopped = supervisor.stopService()
    assert first.signals == ["TERM"] and second.signals == ["TERM"] and spare.signals == ["TERM"]
    spare.end(Failure(ProcessTerminated(signal=15)))
    first.end(CLEAN)
    assert not stopped.called
    assert len(reactor.spawned) == 3, "nothing is restarted while stopping"
    clock.advance(5 + 4)
    assert second.signals == ["TERM"]
    clock.advance(2)
    assert second.signals == ["TERM", "KILL"]
    second.end(KILLED)
    assert stopped.called


def test_an_idle_supervisor_stops_at_once(tmp_path):
    supervisor = Supervisor(FakeReactor(), 2, ["python"], drain_timeout=5, clock=Clock())
    supervisor.startService()  # the port never opened: no worker started
    assert supervisor.stopService().called


def test_per_client_budgets_are_divided_among_workers():
    assert [share_of(30, n) for n in (1, 2, 4, 7, 32)] == [30, 15, 8, 5, 1]
    assert share_of(0, 4) == 0, "no limit stays no limit"
    settings = Settings(
        couchdb=CouchDBCluster.from_urls("http://h:5984"), max_failures=5, max_client_failures=9
    )
    divided = worker_settings(settings, 2)
    assert (divided.max_failures, divided.max_client_failures) == (3, 5)


def test_workers_get_the_twist_runners_own_options():
    plugin = ["--port", "tcp:8000", "--workers", "2"]
    argv = ["/venv/bin/twist", "--log-format", "text", "--log-file", "x.log", "couchtoken", *plugin]
    assert twist_arguments(plugin, argv) == ["--log-format", "text", "--log-file", "x.log"]
    assert twist_arguments([], ["/usr/lib/python3/twisted/__main__.py", "couchtoken"]) == []
    assert twist_arguments(plugin, ["pytest", "-q"]) == [], "not started by twist: nothing to pass on"


WORKER_PAGE = """\
# HELP couchtoken_requests_total HTTP requests answered, by status.
# TYPE couchtoken_requests_total counter
couchtoken_requests_total{{status="200"}} {ok}
couchtoken_requests_total{{status="403"}} 1.0
# HELP couchtoken_request_duration_seconds Time from request to the end of the response.
# TYPE couchtoken_request_duration_seconds histogram
couchtoken_request_duration_seconds_bucket{{le="0.1"}} {ok}
couchtoken_request_duration_seconds_bucket{{le="+Inf"}} {all}
couchtoken_request_duration_seconds_count {all}
couchtoken_request_duration_seconds_sum 0.5
# HELP couchtoken_downloads_in_flight Downloads being served now.
# TYPE couchtoken_downloads_in_flight gauge
couchtoken_downloads_in_flight 2.0
# HELP couchtoken_cache_entries Documents in the cache.
# TYPE couchtoken_cache_entries gauge
couchtoken_cache_entries {entries}
"""


def page(ok: float, entries: float) -> list:
    return parse(WORKER_PAGE.format(ok=ok, all=ok + 1, entries=entries))


def samples(families) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    class Collected:
        def collect(self):
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_are_summed_over_workers_except_each_workers_own_cache():
    total = MetricsSum()
    answers = {0: page(ok=3, entries=5), 1: page(ok=4, entries=7)}
    for slot, families in answers.items():
        total.observe(slot, families)
    figures = samples(total.collect(answers))
    assert figures[("couchtoken_requests_total", (("status", "200"),))] == 7
    assert figures[("couchtoken_requests_total", (("status", "403"),))] == 2
    assert figures[("couchtoken_request_duration_seconds_bucket", (("le", "+Inf"),))] == 9
    assert figures[("couchtoken_request_duration_seconds_count", ())] == 9
    assert figures[("couchtoken_downloads_in_flight", ())] == 4
    assert figures[("couchtoken_cache_entries", (("worker", "0"),))] == 5
    assert figures[("couchtoken_cache_entries", (("worker", "1"),))] == 7
    assert ("couchtoken_cache_entries", ()) not in figures
    assert total.requests(0, answers[0]) == 4


def test_counters_of_a_worker_that_ended_stay_in_the_sums_gauges_do_not():
    total = MetricsSum()
    total.observe(0, page(ok=3, entries=5))
    total.observe(1, page(ok=4, entries=7))
    total.retire(0)  # worker 0 died; its replacement starts from zero
    answers = {0: page(ok=1, entries=1), 1: page(ok=5, entries=7)}
    figures = samples(total.collect(answers))
    assert figures[("couchtoken_requests_total", (("status", "200"),))] == 3 + 1 + 5
    assert figures[("couchtoken_request_duration_seconds_count", ())] == 4 + 2 + 6
    assert figures[("couchtoken_downloads_in_flight", ())] == 4
    assert figures[("couchtoken_cache_entries", (("worker", "0"),))] == 1
    assert total.requests(0, answers[0]) == (3 + 1) + (1 + 1)


def test_assignments_survive_the_line_they_travel_on():
    assignment = Assignment(1, 4, 6, (3, 4, 5, 6))
    line = assignment.encode()
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert Assignment.decode(line) == assignment
    assert json.loads(line)["slot"] == 1


def test_workers_on_one_shared_socket_all_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    reactor = FakeReactor()
    shared = socket.socket()
    supervisor = Supervisor(reactor, 3, ["python"], drain_timeout=5, clock=Clock())
    supervisor.ports_ready([shared.fileno()] * 3)  # systemd's one socket
    supervisor.startService()
    assignments = [process.assignment for process in reactor.spawned[:3]]
    assert {a.public_fd for a in assignments} == {3}
    assert len({a.ops_fd for a in assignments}) == 3
    assert list(reactor.child_fds[0].values()).count(shared.fileno()) == 1
    shared.close()


def test_a_spare_that_dies_is_started_again_with_backoff(supervisor):
    supervisor, reactor, clock = supervisor
    spare = reactor.spawned[2]
    spare.end(KILLED)
    assert len(reactor.spawned) == 3
    clock.advance(0.25)
    assert len(reactor.spawned) == 4 and reactor.spawned[3].assignment is None
    reactor.spawned[3].end(KILLED)
    clock.advance(0.19)
    assert len(reactor.spawned) == 4, "the second start waits longer (0.2 s and jitter)"
    clock.advance(0.12)
    assert len(reactor.spawned) == 5
