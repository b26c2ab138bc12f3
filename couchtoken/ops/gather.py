"""The supervisor's ``--metrics-port``: ``/_metrics`` summed over the workers, ``/_health`` for them all.

The supervisor asks each running worker for its own ``/_metrics`` and
``/_health`` over the worker's private unix socket when it is itself asked.
Metrics are summed over the workers, so every name means what it means
for a single process; counters and histograms keep the last figures seen
from a worker that ended, so their sums never go down when a worker is
restarted (what it counted between that scrape and its end is lost).  The
figures a sum would misstate (each worker's own cache and feeds) keep one
series per worker, with a ``worker`` label; so do the supervisor's own
figures about the workers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.iweb import IAgentEndpointFactory, IRequest
from zope.interface import implementer

if TYPE_CHECKING:
    from couchtoken.ops.workers import Supervisor, WorkerSlot

# Families whose sum would misstate things: each worker has its own cache and its own feeds.
PER_WORKER = frozenset({"couchtoken_cache_entries", "couchtoken_feeds_connected"})
# Families whose samples only grow while a process lives.
MONOTONIC = frozenset({"counter", "histogram", "summary"})
REQUESTS = "couchtoken_requests_total"

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, labels


def _key(family: Metric, sample: Any) -> SampleKey:
    return family.name, sample.name, tuple(sorted(sample.labels.items()))


def parse(text: str) -> list[Metric]:
    """One worker's ``/_metrics`` page as metric families."""
    return list(text_string_to_metric_families(text))


class MetricsSum:
    """Sums the workers' metric families; keeps the counts of workers that ended."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str]] = {}  # name -> (type, help), in first-seen order
        self._last: dict[int, list[Metric]] = {}  # slot -> its running worker's last answer
        self._retired: dict[SampleKey, float] = {}  # monotonic samples of the workers that ended
        self._retired_requests: dict[int, float] = {}  # slot -> requests its ended workers answered

    def observe(self, slot: int, families: list[Metric]) -> None:
        """A worker's answer to a scrape."""
        for family in families:
            self._families.setdefault(family.name, (family.type, family.documentation))
        self._last[slot] = families

    def retire(self, slot: int) -> None:
        """The worker in ``slot`` ended: carry its last counts over into the sums."""
        for family in self._last.pop(slot, []):
            if family.type not in MONOTONIC:
                continue
            for sample in family.samples:
                key = _key(family, sample)
                self._retired[key] = self._retired.get(key, 0.0) + sample.value
                if sample.name == REQUESTS:
                    self._retired_requests[slot] = self._retired_requests.get(slot, 0.0) + sample.value

    def requests(self, slot: int, answer: list[Metric] | None) -> float:
        """Requests answered in ``slot`` since the supervisor started (as far as scrapes saw)."""
        live = sum(
            sample.value for family in answer or [] for sample in family.samples if sample.name == REQUESTS
        )
        return live + self._retired_requests.get(slot, 0.0)

    def collect(self, answers: Mapping[int, list[Metric]]) -> Iterator[Metric]:
        """The summed families, from this scrape's ``answers`` (slot -> families) and the retired counts."""
        totals: dict[SampleKey, float] = dict(self._retired)
        per_worker: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for slot, families in sorted(answers.items()):
            for family in families:
                for sample in family.samples:
                    if family.name in PER_WORKER:
                        labels = {**sample.labels, "worker": str(slot)}
                        per_worker.setdefault(family.name, []).append((sample.name, labels, sample.value))
                    else:
                        key = _key(family, sample)
                        totals[key] = totals.get(key, 0.0) + sample.value
        by_family: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for (family_name, sample_name, labels), value in totals.items():
            by_family.setdefault(family_name, []).append((sample_name, dict(labels), value))
        for name, (kind, documentation) in self._families.items():
            metric = Metric(name, documentation, kind)
            for sample_name, labels, value in per_worker.get(name, []) + by_family.get(name, []):
                metric.add_sample(sample_name, labels, value)
            yield metric


class _QuietClientFactory(_HTTP11ClientFactory):
    """The scrapes' connection factory, without two log lines per scrape."""

    noisy = False


@implementer(IAgentEndpointFactory)
class _UnixSocket:
    def __init__(self, reactor: Any, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=self._timeout)


def quiet_pool(reactor: Any) -> HTTPConnectionPool:
    """A connection per scrape, not logged."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietClientFactory  # a documented, if private, ivar
    return pool


async def ask_worker(
    reactor: Any, pool: HTTPConnectionPool, path: str, page: bytes, timeout: float
) -> tuple[int, bytes] | None:
    """GET ``page`` from the worker listening on ``path``: (status, body), or None if it does not answer."""
    agent = Agent.usingEndpointFactory(reactor, _UnixSocket(reactor, path, timeout), pool)
    try:
        response = await agent.request(b"GET", b"http://worker" + page).addTimeout(timeout, reactor)
        body = await readBody(response).addTimeout(timeout, reactor)
    except Exception:  # refused, timed out, cut: this worker does not answer now
        return None
    return response.code, body


class _Collected:
    """A collector yielding families gathered beforehand (the scrape itself is asynchronous)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class Fleet:
    """What the supervisor knows of its workers: their summed metrics and their health."""

    content_type = CONTENT_TYPE_LATEST.encode("ascii")

    def __init__(self, supervisor: Supervisor, reactor: Any, timeout: float = 3.0) -> None:
        self._supervisor = supervisor
        self._reactor = reactor
        self._timeout = timeout
        self._sum = MetricsSum()
        self._pool = quiet_pool(reactor)
        supervisor.on_ended = lambda slot: self._sum.retire(slot.index)

    async def _ask_all(self, page: bytes) -> dict[int, tuple[int, bytes]]:
        """Each running worker's answer by slot (those that did not answer, or ended meanwhile, left out)."""
        slots = self._supervisor.running_slots()
        pids = [slot.pid for slot in slots]
        answers = await gatherResults(
            [
                Deferred.fromCoroutine(
                    ask_worker(self._reactor, self._pool, slot.ops_path, page, self._timeout)
                )
                for slot in slots
            ]
        )
        return {
            slot.index: answer
            for slot, pid, answer in zip(slots, pids, answers, strict=True)
            if answer is not None and slot.pid == pid
        }

    async def metrics(self) -> bytes:
        """The ``/_metrics`` page: the workers' figures summed, and the supervisor's own."""
        answers: dict[int, list[Metric]] = {}
        for index, (status, body) in (await self._ask_all(b"/_metrics")).items():
            if status == 200:
                answers[index] = parse(body.decode("utf-8"))
                self._sum.observe(index, answers[index])
        families = list(self._sum.collect(answers))
        families += self._worker_families(answers)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected(families))
        return generate_latest(registry)

    def _worker_families(self, answers: Mapping[int, list[Metric]]) -> list[Metric]:
        slots: list[WorkerSlot] = self._supervisor.slots
        up = GaugeMetricFamily(
            "couchtoken_worker_up", "1 when the worker answered this scrape.", labels=["worker"]
        )
        pid = GaugeMetricFamily(
            "couchtoken_worker_pid", "Process id of the worker (0 while it is down).", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "couchtoken_worker_restarts",
            "Times the worker was started again after it ended.",
            labels=["worker"],
        )
        requests = CounterMetricFamily(
            "couchtoken_worker_requests",
            "HTTP requests the worker answered (its share of the load).",
            labels=["worker"],
        )
        for slot in slots:
            label = [str(slot.index)]
            up.add_metric(label, 1 if slot.index in answers else 0)
            pid.add_metric(label, slot.pid or 0)
            restarts.add_metric(label, slot.restarts)
            requests.add_metric(label, self._sum.requests(slot.index, answers.get(slot.index)))
        return [up, pid, restarts, requests]

    async def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body): 200 when some worker runs and reaches CouchDB, else 503."""
        answers = await self._ask_all(b"/_health")
        workers: list[dict[str, Any]] = []
        for slot in self._supervisor.slots:
            entry: dict[str, Any] = {"worker": slot.index, "pid": slot.pid}
            answer = answers.get(slot.index)
            if answer is None:
                entry["status"] = "down" if slot.pid is None else "not answering"
            else:
                try:
                    entry.update(json.loads(answer[1]))
                except ValueError:
                    entry["status"] = "not answering"
            workers.append(entry)
        ok = any(entry.get("status") == "ok" for entry in workers)
        status = "ok" if ok else "unavailable"
        return (200 if ok else 503), {"status": status, "couchdb": status, "workers": workers}


class FleetOpsApp:
    """The supervisor's ``--metrics-port`` site: ``/_metrics`` and ``/_health`` for all the workers."""

    app = Klein()

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def resource(self) -> Any:
        return self.app.resource()

    @staticmethod
    def _answer(request: IRequest, content_type: bytes, raw: bytes) -> bytes:
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(raw))
        return raw

    @app.route("/_metrics", methods=["GET", "HEAD"])
    async def metrics(self, request: IRequest) -> bytes:
        return self._answer(request, self._fleet.content_type, await self._fleet.metrics())

    @app.route("/_health", methods=["GET", "HEAD"])
    async def health(self, request: IRequest) -> bytes:
        status, body = await self._fleet.health()
        request.setResponseCode(status)
        return self._answer(request, b"application/json", json.dumps(body, separators=(",", ":")).encode())
