"""The downloads being served: admission under ``--max-downloads``, and the drain on stop.

Over HTTP/2 each stream is a download of its own.  The HTTP/2 connections
register in ``connections``; the drain sends each one GOAWAY, and they close
themselves once their running streams are finished.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from couchtoken.web.abort import abort_response

_log = Logger()


class InFlight:
    """Tracks running downloads; while draining, closes each connection once its download is sent."""

    def __init__(self, clock: Any, max_downloads: int) -> None:
        self._clock = clock
        self.max_downloads = max_downloads
        self.active: set[IRequest] = set()
        self._drained: Deferred[None] | None = None
        self._closing: list[Any] = []  # transports flushing their last bytes while draining
        self.connections: set[Any] = set()  # open HTTP/2 connections (``GuardedH2Connection``)

    def __len__(self) -> int:
        return len(self.active)

    @property
    def draining(self) -> bool:
        return self._drained is not None

    def full(self) -> bool:
        return len(self.active) >= self.max_downloads

    def add(self, request: IRequest) -> None:
        self.active.add(request)

    def done(self, request: IRequest) -> None:
        self.active.discard(request)
        channel = getattr(request, "channel", None)
        if self._drained is not None and channel is not None and channel.transport is not None:
            # Klein finishes the response after the route returns; then close the
            # connection (keep-alive or not), which first flushes what the client
            # has not read yet.  The channel's own loseConnection unregisters it
            # as the transport's producer; the transport's would wait for ever.
            self._closing.append(channel.transport)
            self._clock.callLater(0, channel.loseConnection)

    def drain(self, timeout: float) -> Deferred[None]:
        """Fire once the running downloads are sent and flushed, or cut them at ``timeout``."""
        if self._drained is None:
            self._drained = Deferred()
            if self.active:
                _log.info(
                    "Draining {count} download(s) for up to {timeout:g}s",
                    count=len(self.active),
                    timeout=timeout,
                )
            watch = LoopingCall(self._check_drained)
            watch.clock = self._clock
            watch.start(0.05)
            cut = self._clock.callLater(timeout, self._cut_remaining)

            def stop_watching(result: object) -> object:
                watch.stop()
                if cut.active():
                    cut.cancel()
                return result

            self._drained.addBoth(stop_watching)
            for connection in list(self.connections):
                connection.drain()
        return self._drained

    def _check_drained(self) -> None:
        self._closing = [t for t in self._closing if getattr(t, "connected", False)]
        if (
            not self.active
            and not self._closing
            and not self.connections
            and self._drained is not None
            and not self._drained.called
        ):
            _log.info("Drained: every download is sent")
            self._drained.callback(None)

    def _cut_remaining(self) -> None:
        _log.warn("Drain timeout: cutting {count} download(s)", count=len(self.active) + len(self._closing))
        for request in list(self.active):
            abort_response(request)
        for transport in self._closing:
            transport.abortConnection()
        self._closing = []
        for connection in list(self.connections):
            connection.transport.abortConnection()
