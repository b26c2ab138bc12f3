"""Stream an upstream response body to a client request with backpressure.

The relay registers itself as the request's streaming producer and passes
pause/resume on to the upstream transport, so when the client's socket
buffer fills, Twisted stops reading from CouchDB: memory stays flat however
slow the client.  It can also cut a byte window out of the stream, for
servers that ignore ``Range`` (PouchDB Server).

Endings:
- upstream body complete: the returned Deferred fires and the response is
  finished normally;
- upstream dies mid-body: the client connection is aborted (over HTTP/2,
  the request's stream is reset), so the client sees a broken response,
  never a short body that looks complete;
- client goes away (the Deferred is cancelled): the upstream connection is
  closed at once instead of being drained;
- client stops reading: after ``idle_timeout`` seconds paused, the client
  connection is cut, which ends the download as above;
- CouchDB stops sending mid-body while the client is reading: after
  ``upstream_timeout`` seconds of silence the client connection is aborted
  and the upstream closed.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IRequest, IResponse
from zope.interface import implementer

from couchtoken.web.abort import abort_response
from couchtoken.web.idle import IdleCut

_log = Logger()


class Tee(typing.Protocol):
    """Something that keeps a copy of what is sent: a list, or a disk cache fill."""

    def append(self, data: bytes, /) -> None: ...


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """Relays ``[skip, skip + limit)`` of an upstream body into ``request``."""

    def __init__(
        self,
        request: IRequest,
        skip: int = 0,
        limit: int | None = None,
        *,
        clock: Any = None,
        idle_timeout: float | None = None,
        on_idle: Callable[[], None] = lambda: None,
        tee: Tee | None = None,
        upstream_timeout: float | None = None,
    ) -> None:
        self._request = request
        self._tee = tee
        self._upstream_timeout = upstream_timeout
        self._stall_call: Any = None
        self._paused = False
        self._skip = skip
        self._remaining = limit
        self._clock = clock
        self._idle = IdleCut(clock, idle_timeout, on_idle=on_idle, cut=self._abort_client)
        self._ended = False
        self.done: Deferred[None] = Deferred(self._client_gone)

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._expect_upstream()

    # IPushProducer, as seen by the client connection.
    def pauseProducing(self) -> None:
        self._paused = True
        self._cancel(self._stall_call)  # silence from CouchDB is our doing now
        self._stall_call = None
        self._idle.paused()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self._idle.resumed()
        self._expect_upstream()
        self.transport.resumeProducing()

    def _expect_upstream(self) -> None:
        """(Re)start the wait for CouchDB's next bytes."""
        if self._clock is None or not self._upstream_timeout or self._paused or self._ended:
            return
        if self._stall_call is not None and self._stall_call.active():
            self._stall_call.reset(self._upstream_timeout)
        else:
            self._stall_call = self._clock.callLater(self._upstream_timeout, self._upstream_stalled)

    def _upstream_stalled(self) -> None:
        self._stall_call = None
        if self._ended:
            return
        _log.warn(
            "CouchDB sent no attachment bytes for {seconds:g}s; aborting the client response",
            seconds=self._upstream_timeout,
        )
        self._end()
        self.transport.stopProducing()
        self._abort_client()

    def stopProducing(self) -> None:
        self._client_gone(self.done)

    def dataReceived(self, data: bytes) -> None:
        if self._ended:
            return
        self._expect_upstream()
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
            if self._tee is not None:
                self._tee.append(data)
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
        self._abort_client()

    def _abort_client(self) -> None:
        abort_response(self._request)

    @staticmethod
    def _cancel(call: Any) -> None:
        if call is not None and call.active():
            call.cancel()

    def _end(self) -> None:
        self._ended = True
        self._idle.stop()
        self._cancel(self._stall_call)
        self._stall_call = None
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
    response: IResponse, request: IRequest, skip: int = 0, limit: int | None = None, **extra: Any
) -> Deferred[None]:
    """Start relaying ``response``'s body; the Deferred fires when it is all sent.

    ``extra`` takes ``clock``, ``idle_timeout``, ``on_idle``, ``upstream_timeout``
    and ``tee`` (a ``Tee`` that gets a copy of what is sent); see ``BodyRelay``.
    """
    relay = BodyRelay(request, skip, limit, **extra)
    response.deliverBody(relay)
    return relay.done
