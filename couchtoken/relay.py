"""Stream an upstream response body to a client request with backpressure.

The upstream transport is registered as the request's streaming producer, so
when the client's socket buffer fills, Twisted pauses reading from CouchDB:
memory stays flat however slow the client.  The relay can also cut a byte
window out of the stream, for servers that ignore ``Range`` (PouchDB Server).

Endings:
- upstream body complete: the returned Deferred fires and the response is
  finished normally;
- upstream dies mid-body: the client connection is aborted, so the client
  sees a broken response, never a short body that looks complete;
- client goes away (the Deferred is cancelled): the upstream connection is
  closed at once instead of being drained.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IRequest, IResponse

_log = Logger()


class BodyRelay(Protocol):
    """Relays ``[skip, skip + limit)`` of an upstream body into ``request``."""

    def __init__(self, request: IRequest, skip: int = 0, limit: int | None = None) -> None:
        self._request = request
        self._skip = skip
        self._remaining = limit
        self._ended = False
        self.done: Deferred[None] = Deferred(self._client_gone)

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
        if data:
            self._request.write(data)
        if self._remaining == 0:
            # The window is complete; the rest of the upstream body is not needed.
            self._end()
            self.transport.stopProducing()
            self.done.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._ended:
            return
        self._end()
        if reason.check(ResponseDone) and not self._remaining:
            self.done.callback(None)
            return
        _log.warn(
            "CouchDB's attachment body broke off mid-stream; aborting the client response ({why})",
            why=type(reason.value).__name__,
        )
        # Aborting makes the client see an incomplete response.  ``done`` is
        # left pending: the lost connection makes Klein cancel it.
        transport = getattr(self._request, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _end(self) -> None:
        self._ended = True
        try:
            self._request.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass  # the client connection is already gone

    def _client_gone(self, _: Deferred) -> None:
        if not self._ended:
            self._end()
            if self.transport is not None:
                self.transport.stopProducing()


def relay_body(
    response: IResponse, request: IRequest, skip: int = 0, limit: int | None = None
) -> Deferred[None]:
    """Start relaying ``response``'s body; the Deferred fires when it is all sent."""
    relay = BodyRelay(request, skip, limit)
    response.deliverBody(relay)
    return relay.done
