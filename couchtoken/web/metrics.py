"""Prometheus metrics of one couchtoken instance (its own registry, so tests can run several).

Request-level metrics are counted as requests end; cache and feed figures are
read from the live objects at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

disable_created_metrics()

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# name -> (kind, help) of the figures read at scrape time.
LIVE_FIGURES = {
    "cache_hits": ("counter", "Token checks answered from the cache."),
    "cache_misses": ("counter", "Token checks that needed CouchDB."),
    "cache_evictions": ("counter", "Cached documents dropped by a change or a feed gap."),
    "revocations_applied": ("counter", "Changes from a feed that dropped a cached document."),
    "feed_reconnects": ("counter", "Times a _changes feed had to reconnect."),
    "upstream_failovers": ("counter", "Times a CouchDB node stopped answering and requests moved on."),
    "blob_cache_hits": ("counter", "Attachment bodies answered from memory."),
    "blob_cache_misses": ("counter", "Small attachment bodies that had to come from CouchDB."),
    "blob_cache_bytes": ("gauge", "Bytes of attachment bodies held in memory."),
    "disk_cache_hits": ("counter", "Attachment bodies answered from the disk cache."),
    "disk_cache_misses": ("counter", "Bodies the disk cache would hold that had to come from CouchDB."),
    "disk_cache_bytes": ("gauge", "Bytes of files held by the disk cache."),
    "disk_cache_fills": ("counter", "Files written to the disk cache."),
    "disk_cache_fill_failures": ("counter", "Disk cache fills dropped (cut, failed, mismatched)."),
    "disk_cache_evictions": ("counter", "Disk cache files removed for room or a deleted database."),
    "disk_cache_fallbacks": ("counter", "Disk cache I/O errors or bad files; CouchDB served instead."),
    "cache_entries": ("gauge", "Documents in the cache."),
    "cache_bytes": ("gauge", "Bytes the cached documents hold (an estimate that errs high)."),
    "feeds_connected": ("gauge", "_changes feeds connected and live."),
    "client_connections": ("gauge", "Client connections open on the public port."),
    "connections_refused": ("counter", "Client connections closed at once: the descriptor budget was full."),
    "upstream_requests": ("gauge", "Requests open at CouchDB now (feeds apart; at most --max-connections)."),
    "upstream_queued": ("gauge", "Requests waiting for one of the --max-connections to come free."),
}


class _LiveFigures:
    """A collector that reads ``LIVE_FIGURES`` from a callable at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        figures = self._read()
        for name, (kind, text) in LIVE_FIGURES.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"couchtoken_{name}", text, value=figures.get(name, 0))


class Metrics:
    """Every metric the service exports."""

    content_type = CONTENT_TYPE_LATEST.encode("ascii")

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "couchtoken_requests", "HTTP requests answered, by status.", ["status"], registry=r
        )
        self.bytes_sent = Counter(
            "couchtoken_response_bytes", "Response body bytes sent to clients.", registry=r
        )
        self.duration = Histogram(
            "couchtoken_request_duration_seconds",
            "Time from request to the end of the response.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "couchtoken_upstream_errors", "Failed exchanges with CouchDB, by kind.", ["kind"], registry=r
        )
        self.rejected = Counter(
            "couchtoken_downloads_rejected",
            "Downloads refused with 503 because of --max-downloads.",
            registry=r,
        )
        self.idle_disconnects = Counter(
            "couchtoken_idle_disconnects", "Downloads cut because the client stopped reading.", registry=r
        )
        self.in_flight = Gauge("couchtoken_downloads_in_flight", "Downloads being served now.", registry=r)

    def watch(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Export the cache and feed figures that ``read`` returns at scrape time."""
        self.registry.register(_LiveFigures(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
