"""Operator endpoints: ``/_health`` and ``/_metrics``.

No CouchDB database can be named ``_health`` or ``_metrics``, so the paths
never shadow a download.  With ``--metrics-port`` both are also served on
that endpoint, and ``/_metrics`` leaves the public port.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from couchtoken.upstream.cache import DocumentCache
from couchtoken.upstream.client import CouchDBClient
from couchtoken.upstream.coverage import Coverage
from couchtoken.web.metrics import Metrics

HEALTH_PATH = b"/_health"
METRICS_PATH = b"/_metrics"


class HealthCheck:
    """Is CouchDB answering?  Asked at most once a second, however often it is polled."""

    def __init__(
        self,
        client: CouchDBClient,
        feeds: Coverage,
        documents: DocumentCache,
        clock: Any,
        *,
        timeout: float,
        max_age: float = 1.0,
    ) -> None:
        self._client = client
        self._feeds = feeds
        self._documents = documents
        self._clock = clock
        self._timeout = timeout
        self._max_age = max_age
        self._checked_at: float | None = None
        self._couchdb_ok = False
        self._asking: list[Deferred[bool]] | None = None

    async def _couchdb_answers(self) -> bool:
        now = self._clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self._max_age:
            return self._couchdb_ok
        if self._asking is not None:  # single flight
            waiter: Deferred[bool] = Deferred()
            self._asking.append(waiter)
            return await waiter
        self._asking = []
        try:
            self._couchdb_ok = await self._client.ping(self._timeout)
        finally:
            self._checked_at = self._clock.seconds()
            waiting, self._asking = self._asking, None
            for waiter in waiting:
                waiter.callback(self._couchdb_ok)
        return self._couchdb_ok

    async def report(self, details: bool = True) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body): 200 when CouchDB answers, else 503.

        Without ``details`` the body is the status alone: feed counts would
        tell an outsider which databases exist.
        """
        ok = await self._couchdb_answers()
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable"}
        if details:
            body["couchdb"] = body["status"]
            body["nodes"] = self._client.nodes.states()
            body["feeds"] = self._feeds.details()
            body["cache"] = {"entries": len(self._documents), "bytes": self._documents.bytes_held}
        return (200 if ok else 503), body


class OpsEndpoints:
    """Renders the two endpoints onto a request; shared by the public and the metrics port."""

    def __init__(self, health: HealthCheck, metrics: Metrics) -> None:
        self.health = health
        self.metrics = metrics

    async def render_health(self, request: IRequest, details: bool = True) -> bytes:
        status, body = await self.health.report(details)
        raw = json.dumps(body, separators=(",", ":")).encode("ascii")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(raw))
        return raw

    def render_metrics(self, request: IRequest) -> bytes:
        raw = self.metrics.render()
        request.setHeader(b"content-type", self.metrics.content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(raw))
        return raw

    def public_pages(self, with_metrics: bool) -> dict[bytes, Any]:
        """What the public port serves besides downloads: the bare health status, maybe metrics."""
        pages: dict[bytes, Any] = {HEALTH_PATH: lambda request: self.render_health(request, details=False)}
        if with_metrics:
            pages[METRICS_PATH] = self.render_metrics
        return pages


class OpsApp:
    """The ``--metrics-port`` site: ``/_metrics`` and ``/_health``, nothing else."""

    app = Klein()

    def __init__(self, endpoints: OpsEndpoints) -> None:
        self._endpoints = endpoints

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/_metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        return self._endpoints.render_metrics(request)

    @app.route("/_health", methods=["GET", "HEAD"])
    async def health(self, request: IRequest) -> bytes:
        return await self._endpoints.render_health(request)
