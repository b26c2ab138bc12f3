"""The HTTP/1.1 connection of the public port, guarded against hostile clients.

- A request line longer than ``MAX_REQUEST_LINE`` bytes gets 414, request
  headers larger than ``MAX_HEADER_BYTES`` get 431 (Twisted would answer a
  bare 400 for both).
- A request's line and headers must arrive within ``header_timeout`` seconds
  of its first byte (408 otherwise): a client trickling bytes now and then
  (slowloris), even before the request line is complete, cannot hold a
  connection for ever.  Idle keep-alive connections are closed by the
  Site's own idle timeout.
- No request here takes a body: one that announces a body (a
  ``Content-Length`` above 0, or ``Transfer-Encoding: chunked``) gets 413
  as soon as its headers are in, before any of the body is read (Twisted
  would otherwise read it all, spooling large ones to disk).
- Each refusal is told to the Site (``request_refused``, when it has it), so
  it reaches the access log and the metrics like any other answer.
- The Site counts its open connections (``opened``/``closed`` on the
  factory, when it has them), so it can refuse new ones before the process
  runs out of file descriptors.

HTTP/2 has its own guarded connection (``couchtoken.web.h2``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from twisted.web.http import HTTPChannel

from couchtoken.web.limits import MAX_HEADER_BYTES, MAX_REQUEST_LINE, REASONS


class GuardedHTTPChannel(HTTPChannel):
    """``HTTPChannel`` with 413/414/431 limits and a deadline for request headers."""

    MAX_REQUEST_LINE = MAX_REQUEST_LINE
    MAX_HEADER_BYTES = MAX_HEADER_BYTES
    MAX_LENGTH = MAX_HEADER_BYTES  # LineReceiver: the longest line it will buffer
    header_timeout = 10.0

    _lines = 0
    _header_bytes = 0
    _deadline: Any = None
    _first_byte_at = 0.0
    _refused = False
    _counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        opened = getattr(self.factory, "connection_opened", None)
        if opened is not None:
            opened()
            self._counted = True

    def dataReceived(self, data: bytes) -> None:
        # The clock starts at a request's first byte.  While a request is being
        # answered, Twisted only buffers what follows, and plays it back here.
        if data and self._deadline is None and not self._handlingRequest and not self._refused:
            self._start_header_clock()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._lines == 0 and not line:
            self._reset()  # a stray CRLF between requests (Twisted accepts one)
            super().lineReceived(line)
            return
        if self._deadline is None:
            self._start_header_clock()
        if self._lines == 0 and len(line) > self.MAX_REQUEST_LINE:
            self._refuse(414)
            return
        self._header_bytes += len(line)
        if self._header_bytes > self.MAX_HEADER_BYTES:
            self._refuse(431)
            return
        self._lines += 1
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        if self._transferDecoder is not None and self.length != 0:  # Content-Length > 0, or chunked
            self._refuse(413)
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(414 if self._lines == 0 else 431)

    def allContentReceived(self) -> None:
        self._reset()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._reset()
        if self._counted:
            self._counted = False
            self.factory.connection_closed()
        super().connectionLost(reason)

    def _start_header_clock(self) -> None:
        """A request's first byte: its line and headers have ``header_timeout`` seconds from now."""
        self._first_byte_at = time.monotonic()
        self._deadline = self.callLater(self.header_timeout, self._refuse, 408)

    def _reset(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._lines = 0
        self._header_bytes = 0

    def _refuse(self, status: int) -> None:
        """Answer ``status`` with a small JSON body, tell the Site, and close the connection."""
        self._deadline = None
        if self._refused:
            return
        self._refused = True
        reason = REASONS[status].encode()
        body = json.dumps(
            {"error": reason.decode().lower().replace(" ", "_"), "reason": reason.decode()}
        ).encode()
        answer = (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.write(answer)
        refused = getattr(self.factory, "request_refused", None)
        if refused is not None:
            refused(self.refused_request(status, len(answer)))
        self.loseConnection()

    def refused_request(self, status: int, sent: int) -> RefusedRequest:
        """What is known of the request being refused: its line and headers when they came whole."""
        headers = self.requests[-1].requestHeaders if self.requests and hasattr(self, "_command") else None
        return RefusedRequest(
            peer=self.transport.getPeer(),
            method=getattr(self, "_command", None),
            uri=getattr(self, "_path", None),
            protocol=getattr(self, "_version", None),
            referer=headers.getRawHeaders(b"referer", [None])[0] if headers is not None else None,
            user_agent=headers.getRawHeaders(b"user-agent", [None])[0] if headers is not None else None,
            status=status,
            sent=sent,
            duration=time.monotonic() - self._first_byte_at if self._first_byte_at else 0.0,
        )


@dataclass(frozen=True)
class RefusedRequest:
    """A request the connection answered itself (408, 413, 414, 431): what the access log needs.

    ``method``, ``uri`` and ``protocol`` are None when the request line never came whole.
    """

    peer: Any
    method: bytes | None
    uri: bytes | None
    protocol: bytes | None
    referer: bytes | None
    user_agent: bytes | None
    status: int
    sent: int
    duration: float
