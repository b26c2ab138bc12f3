"""Wiring: one running couchtoken from its settings (everything but the listening ports)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.web.server import Site

from couchtoken.access.throttle import GuessThrottle
from couchtoken.ops.health import HealthCheck, OpsApp, OpsEndpoints
from couchtoken.ops.lifecycle import CouchDBClientService, DrainService
from couchtoken.ops.settings import Settings
from couchtoken.upstream.blobs import BlobCache
from couchtoken.upstream.cache import DocumentCache
from couchtoken.upstream.client import CouchDBClient
from couchtoken.upstream.coverage import Coverage
from couchtoken.upstream.diskcache import DiskCache, DiskCacheService, disk_threads
from couchtoken.web.accesslog import DownloadSite
from couchtoken.web.connections import ConnectionLimit, client_connection_limit, descriptor_limit
from couchtoken.web.delivery import Delivery
from couchtoken.web.inflight import InFlight
from couchtoken.web.metrics import Metrics
from couchtoken.web.presentation import Presentation
from couchtoken.web.routes import DownloadApp


@attrs.define
class Couchtoken:
    """The parts of a running couchtoken, wired together (everything but the listening ports)."""

    settings: Settings
    client: CouchDBClient
    feeds: Coverage
    documents: DocumentCache
    app: DownloadApp
    metrics: Metrics
    blobs: BlobCache
    disk: DiskCache
    site: DownloadSite
    ops_site: Site
    service: MultiService
    startup: CouchDBClientService


def build(settings: Settings, reactor: Any, *, metrics_on_public_port: bool | None = None) -> Couchtoken:
    """Wire the CouchDB client, the feeds, the cache, metrics and the web sites.

    ``/_metrics`` is on the public port only with ``--public-metrics`` (and
    never where ``metrics_on_public_port`` is false: a worker's figures alone
    are not the service's).
    """
    if metrics_on_public_port is None:
        metrics_on_public_port = settings.public_metrics
    client = CouchDBClient(
        settings.couchdb,
        reactor,
        connect_timeout=settings.connect_timeout,
        response_timeout=settings.response_timeout,
        max_connections=settings.max_connections,
    )
    caching = settings.cache_size > 0 and settings.cache_bytes > 0
    feeds = Coverage(
        client,
        reactor,
        max_feeds=settings.max_feeds,
        heartbeat=settings.feed_heartbeat,
        max_databases=settings.cache_size,
        use_global=caching,
    )
    documents = DocumentCache(
        client.fetch_document,
        settings.token_field,
        feeds,
        reactor,
        maxsize=settings.cache_size,
        ttl=settings.cache_ttl,
        max_bytes=settings.cache_bytes,
    )
    blobs = BlobCache(settings.blob_cache_bytes, settings.blob_cache_max_item)
    connections = ConnectionLimit(
        client_connection_limit(
            descriptor_limit(),
            pool=settings.max_connections,
            feeds=settings.max_feeds,
            max_downloads=settings.max_downloads,
        )
    )
    threads, write, check = disk_threads(reactor)
    disk = DiskCache(
        settings.disk_cache_dir,
        settings.disk_cache_bytes,
        settings.disk_cache_max_item,
        run_in_thread=write,
        run_check=check,
    )
    # Files are keyed by digest and served only after a fresh token check, so a feed gap
    # changes nothing about them; a deleted database's files are of no more use.
    feeds.on_gone = disk.drop_database
    feeds.on_change = documents.evict

    def drop(dbs: set[str]) -> None:  # the databases may be gone: nothing of them may be served from memory
        documents.drop_databases(dbs)
        blobs.drop_databases(dbs)

    feeds.on_gap = lambda db: drop({db})
    feeds.on_drop = drop
    metrics = Metrics()
    metrics.watch(
        lambda: {
            "cache_hits": documents.hits,
            "cache_misses": documents.misses,
            "cache_evictions": documents.evictions,
            "revocations_applied": documents.revocations,
            "feed_reconnects": feeds.reconnects,
            "upstream_failovers": client.nodes.failovers,
            "cache_entries": len(documents),
            "cache_bytes": documents.bytes_held,
            "feeds_connected": feeds.connected(),
            "blob_cache_hits": blobs.hits,
            "blob_cache_misses": blobs.misses,
            "blob_cache_bytes": blobs.bytes_held,
            "client_connections": connections.open,
            "connections_refused": connections.refused,
            "disk_cache_hits": disk.hits,
            "disk_cache_misses": disk.misses,
            "disk_cache_bytes": disk.bytes_held,
            "disk_cache_fills": disk.fills,
            "disk_cache_fill_failures": disk.fill_failures,
            "disk_cache_evictions": disk.evictions,
            "disk_cache_fallbacks": disk.fallbacks,
            "upstream_requests": client.slots.in_use,
            "upstream_queued": client.slots.waiting,
        }
    )
    health = HealthCheck(client, feeds, documents, reactor, timeout=min(settings.response_timeout, 5.0))
    ops = OpsEndpoints(health, metrics)
    delivery = Delivery(
        client,
        blobs,
        Presentation(settings.sandbox_types, settings.force_download_types),
        metrics,
        clock=reactor,
        idle_timeout=settings.idle_timeout,
        upstream_timeout=settings.response_timeout,
        disk=disk,
    )
    in_flight = InFlight(reactor, settings.max_downloads)
    app = DownloadApp(
        documents,
        delivery,
        in_flight,
        metrics=metrics,
        clock=reactor,
        operator_pages=ops.public_pages(with_metrics=metrics_on_public_port),
        databases=settings.databases,
        max_link_lifetime=settings.max_link_lifetime,
        throttle=GuessThrottle(
            reactor,
            settings.max_failures,
            max_client_failures=settings.max_client_failures,
            trusted_proxies=settings.trusted_proxies,
        ),
    )
    site = DownloadSite(
        app.resource(),
        metrics=metrics,
        log_format=settings.access_log_format,
        connections=connections,
        in_flight=in_flight,
        http2=settings.http2,
        reactor=reactor,
    )
    ops_site = Site(OpsApp(ops).resource(), reactor=reactor)
    ops_site.log = lambda request: None  # polled every few seconds: not worth a log line
    service = MultiService()
    DiskCacheService(disk, threads).setServiceParent(service)
    startup = CouchDBClientService(client, settings, reactor)
    startup.setServiceParent(service)
    feeds.setServiceParent(service)
    DrainService(app.in_flight, settings.drain_timeout).setServiceParent(service)
    return Couchtoken(
        settings, client, feeds, documents, app, metrics, blobs, disk, site, ops_site, service, startup
    )
