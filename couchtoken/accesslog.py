"""One access-log line per request, through ``twisted.logger``, tokens redacted.

Twisted's own access log prints the full URI, query string and token
included; it is replaced here.  Every query value except a few harmless
ones is written as ``REDACTED``.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.web import server

_SHOWN_QUERY_KEYS = frozenset({b"download"})
_log = Logger(namespace="couchtoken.access")


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
    return path.decode("ascii", "backslashreplace")


class LoggedRequest(server.Request):
    """A request that times itself and logs one line when it ends."""

    def process(self) -> None:
        self._clock = self.channel.factory.reactor  # type: ignore[union-attr]
        self._started = self._clock.seconds()
        self.notifyFinish().addBoth(self._log_access)
        super().process()

    def _log_access(self, result: object) -> None:
        now = self._clock.seconds()
        completed = result is None
        _log.info(
            "{method} {uri} {status} {bytes}B {duration_ms:.1f}ms{aborted}",
            method=self.method.decode("ascii", "replace"),
            uri=redact_uri(self.uri),
            status=self.code,
            bytes=self.sentLength,
            duration_ms=(now - self._started) * 1000,
            aborted="" if completed else " (connection lost)",
            client=getattr(self.getClientAddress(), "host", None),
        )


class DownloadSite(server.Site):
    """A Site whose access log is ``LoggedRequest``'s redacted line."""

    requestFactory = LoggedRequest
    displayTracebacks = False

    def log(self, request: object) -> None:
        """Twisted's own line would print the token; ``LoggedRequest`` logs instead."""
