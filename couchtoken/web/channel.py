"""The HTTP/1.1 connection of the public port, guarded against hostile clients.

- A request line longer than ``MAX_REQUEST_LINE`` bytes gets 414, request
  headers larger than ``MAX_HEADER_BYTES`` get 431 (Twisted would answer a
  bare 400 for both).
- A request's headers must arrive within ``header_timeout`` seconds of its
  first byte (408 otherwise): a client trickling a header byte now and then
  (slowloris) cannot hold a connection for ever.  Idle keep-alive
  connections are closed by the Site's own idle timeout.

HTTP/2 has its own guarded connection (``couchtoken.web.h2``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.http import HTTPChannel

from couchtoken.web.limits import MAX_HEADER_BYTES, MAX_REQUEST_LINE, REASONS


class GuardedHTTPChannel(HTTPChannel):
    """``HTTPChannel`` with 414/431 limits and a deadline for request headers."""

    MAX_REQUEST_LINE = MAX_REQUEST_LINE
    MAX_HEADER_BYTES = MAX_HEADER_BYTES
    MAX_LENGTH = MAX_HEADER_BYTES  # LineReceiver: the longest line it will buffer
    header_timeout = 10.0

    _lines = 0
    _header_bytes = 0
    _deadline: Any = None
    _refused = False

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._lines == 0 and not line:
            super().lineReceived(line)  # a stray CRLF between requests
            return
        if self._deadline is None:
            self._deadline = self.callLater(self.header_timeout, self._refuse, 408)
        if self._lines == 0 and len(line) > self.MAX_REQUEST_LINE:
            self._refuse(414)
            return
        self._header_bytes += len(line)
        if self._header_bytes > self.MAX_HEADER_BYTES:
            self._refuse(431)
            return
        self._lines += 1
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(414 if self._lines == 0 else 431)

    def allContentReceived(self) -> None:
        self._reset()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._reset()
        super().connectionLost(reason)

    def _reset(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._lines = 0
        self._header_bytes = 0

    def _refuse(self, status: int) -> None:
        """Answer ``status`` with a small JSON body and close the connection."""
        self._deadline = None
        if self._refused:
            return
        self._refused = True
        reason = REASONS[status].encode()
        body = json.dumps(
            {"error": reason.decode().lower().replace(" ", "_"), "reason": reason.decode()}
        ).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.loseConnection()
