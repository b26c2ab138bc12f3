"""``twist couchtoken``: command-line options and the service tree.

Options win over environment variables (``COUCHDB_URL``,
``DOWNLOAD_TOKEN_KEY_NAME``), which win over the built-in defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from couchtoken.accesslog import DownloadSite
from couchtoken.app import DownloadApp
from couchtoken.cache import DocumentCache
from couchtoken.config import (
    DEFAULT_COUCHDB_URL,
    DEFAULT_TOKEN_FIELD,
    ConfigError,
    CouchDBServer,
    Settings,
    parse_token_field,
)
from couchtoken.couchdb import CouchDBClient
from couchtoken.feeds import FeedManager

_log = Logger()


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a positive number")
    return number


_positive.coerceDoc = "A positive number of seconds."  # type: ignore[attr-defined]


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


_count.coerceDoc = "A whole number, 0 or more."  # type: ignore[attr-defined]


class Options(usage.Options):
    """twist couchtoken [options]"""

    synopsis = "[options]"
    longdesc = (
        "Serve CouchDB attachments at /<db>/<docid>/<attachment>?token=<t>, "
        "guarded by each document's download token."
    )
    optParameters = [
        ["port", "p", "tcp:8000", "Endpoint to listen on (tcp:8000, ssl:..., unix:..., systemd:...)."],
        [
            "couchdb-url",
            None,
            None,
            "CouchDB URL with admin credentials, http://user:pass@host:5984 "
            f"(default: $COUCHDB_URL, else {DEFAULT_COUCHDB_URL}).",
        ],
        [
            "token-field",
            None,
            None,
            "Document field holding the download token; dots mean nesting, e.g. data.token "
            f"(default: $DOWNLOAD_TOKEN_KEY_NAME, else {DEFAULT_TOKEN_FIELD}).",
        ],
        ["connect-timeout", None, 5.0, "Seconds to wait for a connection to CouchDB (then 504).", _positive],
        [
            "response-timeout",
            None,
            30.0,
            "Seconds to wait for CouchDB's response headers, or a whole document (then 504).",
            _positive,
        ],
        ["max-connections", None, 32, "Persistent connections kept open to CouchDB.", int],
        [
            "cache-size",
            None,
            10_000,
            "Documents whose token check is cached (0 turns the cache and the feeds off).",
            _count,
        ],
        [
            "cache-ttl",
            None,
            600.0,
            "Seconds a cached document lives at most; a safety net, the _changes feeds keep it fresh.",
            _positive,
        ],
        [
            "max-feeds",
            None,
            100,
            "Databases followed by a _changes feed at once; past it the least recently used stop.",
            _count,
        ],
        [
            "feed-heartbeat",
            None,
            5.0,
            "Seconds between the feeds' heartbeats; a feed silent for twice that plus 1 s reconnects.",
            _positive,
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        url = self["couchdb-url"] or self._environ.get("COUCHDB_URL") or DEFAULT_COUCHDB_URL
        field = self["token-field"] or self._environ.get("DOWNLOAD_TOKEN_KEY_NAME") or DEFAULT_TOKEN_FIELD
        try:
            self["settings"] = Settings(
                couchdb=CouchDBServer.from_url(url),
                token_field=parse_token_field(field),
                connect_timeout=self["connect-timeout"],
                response_timeout=self["response-timeout"],
                max_connections_per_host=self["max-connections"],
                cache_size=self["cache-size"],
                cache_ttl=self["cache-ttl"],
                max_feeds=self["max-feeds"],
                feed_heartbeat=self["feed-heartbeat"],
            )
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        # The URL may hold a password: keep only the parsed, masked form.
        self["couchdb-url"] = repr(self["settings"].couchdb)


class _CouchDBClientService(Service):
    """Logs the configuration at start; closes pooled connections at stop."""

    def __init__(self, client: CouchDBClient, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    def startService(self) -> None:
        super().startService()
        _log.info("couchtoken starting: {settings}", settings=self._settings.describe())

    def stopService(self) -> Any:
        super().stopService()
        return self._client.close()


@attrs.define
class Couchtoken:
    """The parts of a running couchtoken, wired together (everything but the listening port)."""

    settings: Settings
    client: CouchDBClient
    feeds: FeedManager
    documents: DocumentCache
    site: DownloadSite
    service: MultiService


def build(settings: Settings, reactor: Any) -> Couchtoken:
    """Wire the CouchDB client, the feeds, the cache and the web site."""
    client = CouchDBClient(
        settings.couchdb,
        reactor,
        connect_timeout=settings.connect_timeout,
        response_timeout=settings.response_timeout,
        max_connections_per_host=settings.max_connections_per_host,
    )
    feeds = FeedManager(client, reactor, max_feeds=settings.max_feeds, heartbeat=settings.feed_heartbeat)
    documents = DocumentCache(
        client.fetch_document,
        settings.token_field,
        feeds,
        reactor,
        maxsize=settings.cache_size,
        ttl=settings.cache_ttl,
    )
    feeds.on_change = documents.evict
    feeds.on_gap = documents.drop_database
    site = DownloadSite(DownloadApp(client, documents).resource(), reactor=reactor)
    service = MultiService()
    _CouchDBClientService(client, settings).setServiceParent(service)
    feeds.setServiceParent(service)
    return Couchtoken(settings, client, feeds, documents, site, service)


def makeService(config: Options, reactor: Any = None) -> MultiService:
    """The service tree ``twist couchtoken`` runs."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    app = build(config["settings"], reactor)
    endpoint = serverFromString(reactor, config["port"])
    StreamServerEndpointService(endpoint, app.site).setServiceParent(app.service)
    return app.service
