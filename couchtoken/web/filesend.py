"""Stream a byte window of an open file to a client request, with backpressure.

Written by hand rather than ``twisted.protocols.basic.FileSender``, which
has no byte window, no idle timeout and no way to tell a read error from the
end.  It is a push producer: it writes 64 KiB chunks (``os.pread``, so
several readers of one file never share a position) until the client's
transport says pause, and resumes when the transport has drained, so memory
stays flat however many clients read however slowly.  After a burst of
chunks it yields to the reactor, so one fast client cannot starve others.

Endings:
- the window is sent: ``done`` fires with the number of bytes sent;
- a read fails or the file is shorter than promised: ``done`` fails with
  ``FileReadError`` (carrying what was sent), the client connection still
  open, so the rest can come from elsewhere;
- the client goes away (``done`` is cancelled, or the transport stops the
  producer): reading stops and the file is closed;
- the client reads nothing for ``idle_timeout`` seconds: its connection is
  cut, which ends the download as above.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import IRequest
from zope.interface import implementer

from couchtoken.web.abort import abort_response
from couchtoken.web.idle import IdleCut

CHUNK = 64 * 1024
BURST = 16  # chunks written before yielding to the reactor


class FileReadError(Exception):
    """The file could not be read to the end of the window; ``sent`` bytes went out."""

    def __init__(self, sent: int, why: str) -> None:
        super().__init__(why)
        self.sent = sent
        self.why = why


@implementer(IPushProducer)
class FileSend:
    """Sends ``count`` bytes of ``fd`` from ``position``; owns ``fd`` and closes it."""

    def __init__(
        self,
        request: IRequest,
        fd: int,
        position: int,
        count: int,
        *,
        clock: Any,
        idle_timeout: float | None = None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self._request = request
        self._fd = fd
        self._position = position
        self._remaining = count
        self._sent = 0
        self._clock = clock
        self._idle = IdleCut(clock, idle_timeout, on_idle=on_idle, cut=self._abort_client)
        self._next_burst: Any = None
        self._paused = False
        self._pumping = False
        self._ended = False
        self.done: Deferred[int] = Deferred(lambda _: self._end())

    def start(self) -> Deferred[int]:
        self._request.registerProducer(self, True)
        self._pump()
        return self.done

    # IPushProducer, as seen by the client connection.
    def pauseProducing(self) -> None:
        self._paused = True
        self._idle.paused()

    def resumeProducing(self) -> None:
        self._paused = False
        self._idle.resumed()
        if not self._pumping:
            self._pump()

    def stopProducing(self) -> None:
        self._end()  # the client is gone; Klein cancels ``done``

    def _pump(self) -> None:
        self._cancel_call(self._next_burst)
        self._next_burst = None
        if self._ended:
            return
        self._pumping = True
        try:
            for _ in range(BURST):
                if self._paused or self._ended or not self._remaining:
                    break
                try:
                    data = os.pread(self._fd, min(CHUNK, self._remaining), self._position)
                except OSError as exc:
                    self._broke(f"read error ({exc.strerror})")
                    return
                if not data:
                    self._broke("the file is shorter than its index entry")
                    return
                self._position += len(data)
                self._remaining -= len(data)
                self._sent += len(data)
                self._request.write(data)
        finally:
            self._pumping = False
        if self._ended:
            return
        if not self._remaining:
            self._end()
            self.done.callback(self._sent)
        elif not self._paused:
            self._next_burst = self._clock.callLater(0, self._pump)

    def _broke(self, why: str) -> None:
        self._end()
        self.done.errback(FileReadError(self._sent, why))

    def _abort_client(self) -> None:
        abort_response(self._request)  # the connection, or over HTTP/2 the stream only

    @staticmethod
    def _cancel_call(call: Any) -> None:
        if call is not None and call.active():
            call.cancel()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._idle.stop()
        self._cancel_call(self._next_burst)
        self._next_burst = None
        try:
            self._request.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass  # the client connection is already gone
        os.close(self._fd)


def send_file(request: IRequest, fd: int, position: int, count: int, **extra: Any) -> Deferred[int]:
    """Start sending; the Deferred fires with the bytes sent (``extra``: see ``FileSend``)."""
    return FileSend(request, fd, position, count, **extra).start()
