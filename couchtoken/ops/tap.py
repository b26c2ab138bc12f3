"""``twist couchtoken``: the command-line options, and the service tree they make.

Options win over environment variables (``COUCHDB_URL``,
``DOWNLOAD_TOKEN_KEY_NAME``), which win over the built-in defaults.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from couchtoken.access.mediatypes import parse_type_option
from couchtoken.access.throttle import UNIX_PEERS
from couchtoken.ops.lifecycle import ExitCleanlyOnSigterm, ListeningPort
from couchtoken.ops.services import build
from couchtoken.ops.settings import DEFAULT_TOKEN_FIELD, Settings, parse_token_field
from couchtoken.ops.worker import make_worker_service
from couchtoken.ops.workers import cpu_count, make_supervisor_service
from couchtoken.upstream.diskcache import directory_problem
from couchtoken.upstream.server import DEFAULT_COUCHDB_URL, ConfigError, CouchDBCluster


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


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


_at_least_one.coerceDoc = "A whole number, 1 or more."  # type: ignore[attr-defined]


def _workers(value: str) -> int:
    if value == "auto":
        return cpu_count()
    if not value.isdigit() or int(value) < 1:
        raise ValueError("must be a whole number, 1 or more, or auto")
    return int(value)


_workers.coerceDoc = "A whole number, 1 or more, or auto (one per CPU)."  # type: ignore[attr-defined]


def _log_format(value: str) -> str:
    if value not in ("combined", "json"):
        raise ValueError("must be combined or json")
    return value


_log_format.coerceDoc = "combined or json."  # type: ignore[attr-defined]


def _list(option: str, value: str) -> tuple[str, ...]:
    """A comma-separated option; given, it must name something, with no empty items."""
    if not value:
        return ()
    items = tuple(item.strip() for item in value.split(","))
    if not all(items):
        raise usage.UsageError(f"--{option} takes a comma-separated list with no empty items: {value!r}")
    return items


def _media_types(option: str, value: str) -> tuple[str, ...]:
    items = _list(option, value)
    for item in items:
        try:
            parse_type_option(item)
        except ValueError as exc:
            raise usage.UsageError(f"--{option}: {exc}") from None
    return items


def _networks(option: str, value: str) -> tuple[str, ...]:
    items = _list(option, value)
    for item in items:
        if item == UNIX_PEERS:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise usage.UsageError(
                f"--{option}: {item!r} is not an IP address or network, or {UNIX_PEERS}"
            ) from None
    return items


def _endpoint(option: str, description: str) -> None:
    """Refuse an endpoint string Twisted cannot parse (it would fail later with a traceback)."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except (IndexError, KeyError):
        raise usage.UsageError(
            f"--{option} {description!r}: no such socket was passed in by systemd"
        ) from None
    except Exception as exc:  # ValueError, TypeError, OSError (a missing key file)...
        why = str(exc) or type(exc).__name__
        raise usage.UsageError(f"--{option} {description!r} is not a usable endpoint: {why}") from None


def _read_url_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise usage.UsageError(f"cannot read the CouchDB URL file {path}: {exc.strerror}") from None


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
            "CouchDB URL with admin credentials, http://user:pass@host:5984, or a comma-separated "
            "list of the nodes of one cluster, in order of preference "
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
            "Seconds to wait for CouchDB's response headers or a whole document (then 504), "
            "and the longest silence allowed in the middle of an attachment.",
            _positive,
        ],
        [
            "max-connections",
            None,
            32,
            "Requests open at CouchDB at once, feeds apart (more wait, up to --response-timeout).",
            _at_least_one,
        ],
        [
            "cache-size",
            None,
            10_000,
            "Documents whose token check is cached (0 turns the cache and the feeds off).",
            _count,
        ],
        [
            "cache-bytes",
            None,
            64 * 1024 * 1024,
            "Memory the cached token checks may hold, in bytes (0 turns the cache and the feeds off).",
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
            "Databases with a _changes feed of their own: the hottest where CouchDB offers "
            "/_db_updates (which covers the rest), else the most recently served.",
            _count,
        ],
        [
            "feed-heartbeat",
            None,
            1.0,
            "Seconds between the feeds' heartbeats; cached checks of a feed silent for 2.5 heartbeats "
            "are not used, and a feed silent for twice that plus 1 s reconnects.",
            _positive,
        ],
        [
            "couchdb-url-file",
            None,
            None,
            "Read the CouchDB URL from this file instead (default: $COUCHDB_URL_FILE); "
            "keeps the password off the command line, e.g. with systemd's LoadCredential=.",
        ],
        [
            "max-downloads",
            None,
            1000,
            "Downloads served at once; past it, 503 with Retry-After.",
            _at_least_one,
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Seconds a client may read nothing before its download is cut.",
            _positive,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On SIGTERM, seconds running downloads get to finish before they are cut.",
            _positive,
        ],
        ["log-format", None, "combined", "Access log lines: combined (Apache style) or json.", _log_format],
        [
            "blob-cache-bytes",
            None,
            64 * 1024 * 1024,
            "Bytes of small attachment bodies kept in memory (0 turns the blob cache off).",
            _count,
        ],
        [
            "blob-cache-max-item",
            None,
            256 * 1024,
            "Largest attachment body, in bytes, the blob cache keeps.",
            _count,
        ],
        [
            "disk-cache-dir",
            None,
            None,
            "Directory for the disk cache of large attachments (default: none, the disk cache is off).",
        ],
        [
            "disk-cache-bytes",
            None,
            10 * 1024**3,
            "Bytes of files the disk cache keeps at most (0 turns it off).",
            _count,
        ],
        [
            "disk-cache-max-item",
            None,
            1024**3,
            "Largest attachment body, in bytes, the disk cache keeps.",
            _count,
        ],
        [
            "databases",
            None,
            "",
            "Comma-separated globs of the databases served (e.g. userdb-*,media); others get 403. "
            "Default: all.",
        ],
        [
            "sandbox-types",
            None,
            "",
            "Comma-separated media types (type/subtype or type/*) served with "
            "Content-Security-Policy: sandbox although passive (images, audio, video, PDF, plain "
            "text, CSV); every other type always is.",
        ],
        [
            "force-download-types",
            None,
            "",
            "Comma-separated media types (type/subtype or type/*) always served as "
            "Content-Disposition: attachment.",
        ],
        [
            "max-link-lifetime",
            None,
            7 * 24 * 3600.0,
            "Seconds ahead a signed link's expiry may be at most.",
            _positive,
        ],
        [
            "max-failures",
            None,
            30,
            "Failed token checks a client may make on one document per minute; past it, 429 for "
            "that document (0: no guess throttling at all).",
            _count,
        ],
        [
            "max-client-failures",
            None,
            300,
            "Failed token checks a client may make per minute across all documents; past it, 429 "
            "for everything (0: no such ceiling).",
            _count,
        ],
        [
            "trusted-proxies",
            None,
            "",
            "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
            "names the client; 'unix' trusts every connection on a unix: port.",
        ],
        [
            "metrics-port",
            None,
            None,
            "Endpoint serving /_metrics and /_health with details (e.g. tcp:9100:interface=127.0.0.1).",
        ],
        [
            "workers",
            None,
            1,
            "Processes accepting on the port: a number, or auto for one per CPU. Past 1, a supervisor "
            "opens the ports, restarts workers that die and sums their metrics on --metrics-port.",
            _workers,
        ],
    ]
    optFlags = [
        ["no-http2", None, "Offer only HTTP/1.1 on TLS ports (by default ALPN offers h2 first)."],
        [
            "public-metrics",
            None,
            "Also serve /_metrics on the public port (off by default: it tells anyone the load and "
            "the cache; prefer --metrics-port).",
        ],
        ["worker", None, "Internal: set by --workers on the processes it starts."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self.arguments: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept for --workers, which starts its workers with the same arguments.
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def _couchdb_url(self) -> str:
        """Command line first, then the environment; a URL or a file holding one, not both."""
        for url, path, where in (
            (self["couchdb-url"], self["couchdb-url-file"], "--couchdb-url and --couchdb-url-file"),
            (
                self._environ.get("COUCHDB_URL"),
                self._environ.get("COUCHDB_URL_FILE"),
                "COUCHDB_URL and _FILE",
            ),
        ):
            if url and path:
                raise usage.UsageError(f"give one of {where}, not both")
            if url:
                return url
            if path:
                return _read_url_file(path)
        return DEFAULT_COUCHDB_URL

    def postOptions(self) -> None:
        if not self["worker"]:  # a worker's port is the socket its supervisor opened
            _endpoint("port", self["port"])
        if self["metrics-port"] is not None:
            _endpoint("metrics-port", self["metrics-port"])
        if self["public-metrics"] and self["workers"] > 1:
            raise usage.UsageError(
                "--public-metrics needs --workers 1 (one worker's figures are not the "
                "service's): use --metrics-port"
            )
        if self["disk-cache-dir"]:
            problem = directory_problem(self["disk-cache-dir"])
            if problem:
                raise usage.UsageError(f"--disk-cache-dir {self['disk-cache-dir']} {problem}")
        url = self._couchdb_url()
        field = self["token-field"] or self._environ.get("DOWNLOAD_TOKEN_KEY_NAME") or DEFAULT_TOKEN_FIELD
        try:
            self["settings"] = Settings(
                couchdb=CouchDBCluster.from_urls(url),
                token_field=parse_token_field(field),
                connect_timeout=self["connect-timeout"],
                response_timeout=self["response-timeout"],
                max_connections=self["max-connections"],
                cache_size=self["cache-size"],
                cache_bytes=self["cache-bytes"],
                cache_ttl=self["cache-ttl"],
                max_feeds=self["max-feeds"],
                feed_heartbeat=self["feed-heartbeat"],
                max_downloads=self["max-downloads"],
                idle_timeout=self["idle-timeout"],
                drain_timeout=self["drain-timeout"],
                access_log_format=self["log-format"],
                metrics_port=self["metrics-port"],
                public_metrics=bool(self["public-metrics"]),
                blob_cache_bytes=self["blob-cache-bytes"],
                blob_cache_max_item=self["blob-cache-max-item"],
                disk_cache_dir=self["disk-cache-dir"] or None,
                disk_cache_bytes=self["disk-cache-bytes"],
                disk_cache_max_item=self["disk-cache-max-item"],
                sandbox_types=_media_types("sandbox-types", self["sandbox-types"]),
                force_download_types=_media_types("force-download-types", self["force-download-types"]),
                databases=_list("databases", self["databases"]),
                max_link_lifetime=self["max-link-lifetime"],
                max_failures=self["max-failures"],
                max_client_failures=self["max-client-failures"],
                trusted_proxies=_networks("trusted-proxies", self["trusted-proxies"]),
                http2=not self["no-http2"],
            )
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None
        # The URL may hold a password: keep only the parsed, masked form.
        self["couchdb-url"] = repr(self["settings"].couchdb)


def makeService(config: Options, reactor: Any = None) -> MultiService:
    """The service tree ``twist couchtoken`` runs: one process, or a supervisor, or one of its workers."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings: Settings = config["settings"]
    if config["worker"]:
        return make_worker_service(settings, config["port"], config["workers"], reactor)
    if config["workers"] > 1:
        return make_supervisor_service(settings, config["port"], config["workers"], config.arguments, reactor)
    parts = build(settings, reactor)
    # Stopping runs in reverse order: the ports close first, then downloads drain.
    ports = [(config["port"], parts.site)]
    if settings.metrics_port:
        ports.append((settings.metrics_port, parts.ops_site))
    for description, site in ports:
        endpoint = serverFromString(reactor, description)
        ListeningPort(endpoint, site, reactor, description).setServiceParent(parts.service)
    ExitCleanlyOnSigterm(reactor).setServiceParent(parts.service)
    return parts.service
