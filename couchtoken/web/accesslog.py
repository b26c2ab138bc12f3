"""One access-log line per request, through ``twisted.logger``, tokens redacted.

Twisted's own access log prints the full URI, query string and token
included; it is replaced here.  Every query value except a few harmless ones
is written as ``REDACTED`` (in the Referer too).  What the client sent is
written as printable ASCII: a backslash doubled, every other byte (control
characters such as ESC, non-ASCII) as ``\\xHH``, so a request cannot rewrite
a terminal or forge a log line.  Lines come in Apache's
combined format followed by the duration and the cache outcome, or as JSON
objects (``--log-format json``).  Each ending request also updates the
request metrics.  Polls of ``/_health`` and ``/_metrics`` are not logged.

``DownloadSite`` also chooses the connections: the guarded HTTP/1.1 channel,
and HTTP/2 where TLS's ALPN agrees on ``h2`` (unless turned off).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web import server

from couchtoken.web.answers import HTTPAnswer, write_answer
from couchtoken.web.channel import GuardedHTTPChannel, RefusedRequest
from couchtoken.web.connections import ConnectionLimit
from couchtoken.web.h2 import NegotiatingChannel
from couchtoken.web.inflight import InFlight
from couchtoken.web.limits import REASONS, refusal
from couchtoken.web.metrics import Metrics

_SHOWN_QUERY_KEYS = frozenset({b"download"})
_QUIET_PATHS = frozenset({b"/_health", b"/_metrics"})
_log = Logger(namespace="couchtoken.access")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(raw: bytes) -> str:
    """Bytes from a request as log text: printable ASCII, ``\\`` doubled, anything else ``\\xHH``."""
    text = raw.replace(b"\\", b"\\\\").decode("ascii", "backslashreplace")
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def redact_uri(uri: bytes) -> str:
    """The request target with every secret-bearing query value replaced."""
    path, sep, query = uri.partition(b"?")
    if sep:
        parts = []
        for pair in query.replace(b";", b"&").split(b"&"):
            key, has_value, _ = pair.partition(b"=")
            shown = unquote_to_bytes(key.replace(b"+", b" "))
            if has_value and shown not in _SHOWN_QUERY_KEYS:
                pair = key + b"=REDACTED"
            parts.append(pair)
        path += b"?" + b"&".join(parts)
    return printable(path)


def _quoted(value: str) -> str:
    return value.replace('"', '\\"')  # backslashes are doubled already (``printable``)


class LoggedRequest(server.Request):
    """A request that times itself and logs one line when it ends."""

    cache_status = "-"
    body_refused = False  # set by the HTTP/2 connection: answered 413 (``couchtoken.web.limits``)

    def __repr__(self) -> str:
        # Twisted puts requests in some of its own log lines: never with the token.
        method = printable(self.method) if self.method else "?"
        return f"<LoggedRequest {method} {redact_uri(self.uri or b'')}>"

    def process(self) -> None:
        self._clock = self.channel.factory.reactor  # type: ignore[union-attr]
        self._started = self._clock.seconds()
        self._wall_started = time.time()
        self.notifyFinish().addBoth(self._ended)
        status = refusal(self)  # HTTP/2: a stream's header block comes whole, checked here (and its body)
        if status is not None:
            self.site = self.channel.site
            reason = REASONS[status]
            self.write(write_answer(self, HTTPAnswer(status, reason.lower().replace(" ", "_"), reason)))
            self.finish()
            return
        super().process()

    def _ended(self, result: object) -> None:
        if self.path in _QUIET_PATHS:
            return
        duration = self._clock.seconds() - self._started
        fields = _fields(
            self.getClientAddress(),
            self._wall_started,
            (self.method, self.uri, self.clientproto),
            (self.getHeader(b"referer"), self.getHeader(b"user-agent")),
            self.code,
            self.sentLength,
            duration,
        )
        fields.update(cache=self.cache_status, completed=result is None)
        self.site.record(fields, duration)  # type: ignore[attr-defined]


def _fields(
    peer: Any,
    started: float,
    line: tuple[bytes | None, bytes | None, bytes | None],
    headers: tuple[bytes | None, bytes | None],
    status: int,
    sent: int,
    duration: float,
) -> dict[str, Any]:
    """A request's access-log fields, each made safe to print; a part never received is ``-``."""
    method, uri, protocol = line
    referer, agent = headers
    return {
        "client": getattr(peer, "host", "-"),
        "time": started,
        "method": printable(method) if method else "-",
        "uri": redact_uri(uri) if uri else "-",
        "protocol": printable(protocol) if protocol else "-",
        "status": status,
        "bytes": sent,
        "referer": redact_uri(referer) if referer else None,
        "user_agent": printable(agent) if agent else None,
        "duration_ms": round(duration * 1000, 3),
        "cache": "-",
        "completed": True,
    }


def _combined(f: dict[str, Any]) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(f["time"]))
    line = (
        f'{f["client"]} - - [{stamp}] "{f["method"]} {_quoted(f["uri"])} {f["protocol"]}" '
        f'{f["status"]} {f["bytes"] or "-"} "{_quoted(f["referer"] or "-")}" '
        f'"{_quoted(f["user_agent"] or "-")}" {f["duration_ms"]:.1f}ms cache={f["cache"]}'
    )
    return line if f["completed"] else line + " aborted"


def _guarded_channel(site: DownloadSite) -> NegotiatingChannel:
    return NegotiatingChannel(GuardedHTTPChannel())


class DownloadSite(server.Site):
    """A Site whose access log is ``LoggedRequest``'s redacted line, on guarded connections.

    Past ``connections.limit`` open connections, new ones are closed as soon as they are accepted.
    ``in_flight`` is told of HTTP/2 connections, so that the drain can send
    them GOAWAY.  With ``http2=False`` ALPN offers ``http/1.1`` only.
    """

    requestFactory = LoggedRequest
    protocol = _guarded_channel
    displayTracebacks = False

    def __init__(
        self,
        resource: Any,
        *,
        metrics: Metrics | None = None,
        log_format: str = "combined",
        connections: ConnectionLimit | None = None,
        in_flight: InFlight | None = None,
        http2: bool = True,
        **kw: Any,
    ):
        super().__init__(resource, **kw)
        self.metrics = metrics
        self.log_format = log_format
        self.connections = connections or ConnectionLimit(None)
        self.in_flight = in_flight
        self.http2 = http2

    def buildProtocol(self, addr: Any) -> Any:
        if not self.connections.admit():
            return None  # Twisted closes the accepted socket
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.connections.opened()

    def record(self, fields: dict[str, Any], duration: float) -> None:
        """One ended request: the metrics, and its access-log line."""
        if self.metrics is not None:
            self.metrics.requests.labels(str(fields["status"])).inc()
            self.metrics.bytes_sent.inc(fields["bytes"])
            self.metrics.duration.observe(duration)
        if self.log_format == "json":
            _log.info("{line}", line=json.dumps(fields, separators=(",", ":")), **fields)
        else:
            _log.info("{line}", line=_combined(fields), **fields)

    def request_refused(self, refused: RefusedRequest) -> None:
        """A request the HTTP/1.1 connection answered itself (408, 413, 414, 431): logged as any other."""
        fields = _fields(
            refused.peer,
            time.time() - refused.duration,
            (refused.method, refused.uri, refused.protocol),
            (refused.referer, refused.user_agent),
            refused.status,
            refused.sent,
            refused.duration,
        )
        self.record(fields, refused.duration)

    def connection_closed(self) -> None:
        self.connections.closed()

    def acceptableProtocols(self) -> list[bytes]:
        """What TLS's ALPN offers: ``h2`` (when on and installed), then ``http/1.1``."""
        offered = super().acceptableProtocols()
        return offered if self.http2 else [p for p in offered if p != b"h2"]

    def log(self, request: object) -> None:
        """Twisted's own line would print the token; ``LoggedRequest`` logs instead."""
