"""HTTP/2 on the public port: the guarded connection, and the channel that picks it by ALPN.

Twisted's ``Site`` builds a ``_GenericHTTPChannelProtocol``, which starts as
HTTP/1.1 and switches to Twisted's ``H2Connection`` when TLS's ALPN agreed on
``h2``.  ``NegotiatingChannel`` does the same with our halves: the guarded
HTTP/1.1 channel (``couchtoken.web.channel``) and ``GuardedH2Connection``.

The guards of HTTP/1.1, over HTTP/2:

- at most ``max_streams`` concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS;
  the h2 library ends a connection that opens more with GOAWAY);
- request header blocks are decoded up to h2's own 64 KiB bound (GOAWAY
  beyond); the 414/431 limits of HTTP/1.1 are checked per stream by the
  request (``couchtoken.web.limits``);
- the header deadline: an incomplete frame, header block or request (a stream
  whose END_STREAM has not come) may last ``header_timeout`` seconds, then
  the connection goes away (GOAWAY, closed);
- the idle timeout: a connection with no open stream for the site's
  ``timeOut`` seconds goes away; PINGs and other control frames do not keep
  it open (Twisted's own timer restarts on any frame);
- backpressure per stream, whatever window the client announced: a
  stream's producer (the relay) is paused while ``QUEUE_HIGH`` bytes wait
  in its queue (Twisted sends one frame per reactor turn, and not at all
  while the network is blocked), not only when its flow-control window is
  used up, so memory stays flat even for a client that reads nothing;
- ``drain()`` (SIGTERM) sends GOAWAY and lets the running streams finish,
  then closes the connection.  The GOAWAY frame is written by hand: h2's
  ``close_connection`` would refuse to send anything more, running streams
  included.

It reads two private attributes of h2's frame buffer (``_data``,
``_headers_buffer``) to see an incomplete frame or header block; the header
deadline tests fail if h2 renames them.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from twisted.web.http import _GenericHTTPChannelProtocol

_log = Logger()

MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = 64 * 1024  # h2's own bound on a decoded header block
# A stream's producer pauses with this much queued and not yet sent, and resumes below QUEUE_LOW.
QUEUE_HIGH = 128 * 1024
QUEUE_LOW = 32 * 1024
FRAMES_PER_TURN = 32


class _NextTurn:
    """Stands in for the reactor in Twisted's send loop: remembers that it wants another turn."""

    wanted = False

    def callLater(self, delay: float, function: Any, *args: Any) -> None:
        self.wanted = True


class GuardedH2Connection(H2Connection):
    """Twisted's ``H2Connection`` with the public port's guards (see the module's docstring)."""

    header_timeout = 10.0
    max_streams = MAX_CONCURRENT_STREAMS

    def __init__(self, reactor: Any = None) -> None:
        super().__init__(reactor)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self._keepalive: float | None = None
        self._deadline: Any = None
        self._unfinished: set[int] = set()  # streams whose request has not ended yet
        self._held_back: set[int] = set()  # streams paused because their queue is full
        self.draining = False
        self.closed = False
        self._counted = False  # counted among the site's open connections (taken over at the switch)

    # Life of the connection.
    def connectionMade(self) -> None:
        self._keepalive = self.timeOut
        super().connectionMade()
        in_flight = getattr(self.site, "in_flight", None)
        if in_flight is not None:
            in_flight.connections.add(self)
            if in_flight.draining:  # once registered as the transport's producer
                self.callLater(0, self.drain)

    def connectionLost(self, reason: Any, _cancelTimeouts: bool = True) -> None:
        self.closed = True
        self._cancel_deadline()
        if self._counted:
            self._counted = False
            self.factory.connection_closed()
        in_flight = getattr(self.site, "in_flight", None)
        if in_flight is not None:
            in_flight.connections.discard(self)
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)

    def loseConnection(self) -> None:
        """Close once what is written is flushed (the transport waits for no producer)."""
        if self.transport is None:
            return
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._watch_incomplete()

    # The idle timeout: only while no stream is open.
    def resetTimeout(self) -> None:
        """Frames alone (PING, SETTINGS...) do not reset the idle timer; streams stop it."""

    def timeoutConnection(self) -> None:
        _log.info("Closing an idle HTTP/2 connection from {client}", client=self.transport.getPeer())
        self._go_away(h2.errors.ErrorCodes.NO_ERROR, "idle")

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        super()._requestReceived(event)
        self.setTimeout(None)
        self._unfinished.add(event.stream_id)  # until its StreamEnded, usually in the same batch

    def _requestEnded(self, event: h2.events.StreamEnded) -> None:
        self._unfinished.discard(event.stream_id)
        super()._requestEnded(event)

    def _requestDone(self, streamID: int) -> None:
        self._unfinished.discard(streamID)
        super()._requestDone(streamID)
        if self.streams or self.closed:
            return
        if self.draining:
            self.loseConnection()
        elif self._keepalive is not None:
            self.setTimeout(self._keepalive)

    # The header deadline.
    def _watch_incomplete(self) -> None:
        if self.closed:
            return
        buffer = self.conn.incoming_buffer
        incomplete = bool(
            getattr(buffer, "_data", None) or getattr(buffer, "_headers_buffer", None) or self._unfinished
        )
        if incomplete and self._deadline is None:
            self._deadline = self.callLater(self.header_timeout, self._too_slow)
        elif not incomplete:
            self._cancel_deadline()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        _log.info(
            "An HTTP/2 request from {client} did not arrive within {seconds:g}s; closing",
            client=self.transport.getPeer(),
            seconds=self.header_timeout,
        )
        self._go_away(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, "request too slow")

    def _go_away(self, error_code: int, why: str) -> None:
        """GOAWAY, then close as ``_terminate`` does."""
        if self.closed:
            return
        self.conn.close_connection(error_code=error_code)
        self._terminate(Failure(ConnectionLost(why)))

    def _terminate(self, reason: Failure) -> None:
        """Flush, close, end the streams; cut the connection if the client keeps it open.

        (Twisted's own leaves the connection registered as the transport's
        producer, so TLS never closes it: a client that does not close stays.)
        """
        if not self._tryToWriteControlData():
            return  # aborted already
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()
        self.connectionLost(reason, _cancelTimeouts=False)

    # The drain.
    def drain(self) -> None:
        """Send GOAWAY: no new streams; close once the running ones are finished."""
        if self.draining or self.closed:
            return
        self.draining = True
        self._tryToWriteControlData()  # what h2 queued goes first
        goaway = GoAwayFrame(stream_id=0, last_stream_id=self.conn.highest_inbound_stream_id, error_code=0)
        self.transport.write(goaway.serialize())
        if not self.streams:
            self.loseConnection()

    # Backpressure: a stream's producer waits while its queue is full.
    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        super().writeDataToStream(streamID, data)
        stream = self.streams.get(streamID)
        if stream is not None and self._queued(streamID) >= QUEUE_HIGH:
            self._held_back.add(streamID)
            stream.flowControlBlocked()

    def _sendPrioritisedData(self, *args: Any) -> None:
        """Twisted's loop sends one frame, then waits a reactor turn: here up to ``FRAMES_PER_TURN``.

        Frames sent in one turn leave in one TLS write and one ``send``; a
        frame per turn made the system calls most of HTTP/2's cost.  Twisted
        uses ``self._reactor`` in this loop only to schedule its next turn, so
        a stand-in collects that wish while the burst goes on.
        """
        reactor, turn = self._reactor, _NextTurn()
        self._reactor = turn
        try:
            for _ in range(FRAMES_PER_TURN):
                turn.wanted = False
                super()._sendPrioritisedData(*args)
                args = ()
                if not turn.wanted:  # idle, blocked or closed: Twisted set up its own wake-up
                    break
        finally:
            self._reactor = reactor
        if turn.wanted:
            reactor.callLater(0, self._sendPrioritisedData)
        if self._held_back:
            for streamID in list(self._held_back):
                stream = self.streams.get(streamID)
                if stream is None:
                    self._held_back.discard(streamID)
                elif self._queued(streamID) <= QUEUE_LOW:
                    self._held_back.discard(streamID)
                    stream.windowUpdated()  # resumes its producer if the window allows

    def _queued(self, streamID: int) -> int:
        """Bytes written to a stream and not yet sent (Twisted sends a frame per reactor turn)."""
        return sum(
            len(chunk) for chunk in self._outboundStreamQueues.get(streamID, ()) if isinstance(chunk, bytes)
        )

    def abortRequest(self, streamID: int) -> None:
        """RST_STREAM, once, for a stream still there; its request learns it is gone.

        (Twisted's own reset forgets the request, which would wait for ever.)
        """
        stream = self.streams.get(streamID)
        if stream is None:
            return
        super().abortRequest(streamID)
        stream.connectionLost(Failure(ConnectionLost("stream reset by the server")))


class NegotiatingChannel(_GenericHTTPChannelProtocol):
    """HTTP/1.1 on ``GuardedHTTPChannel``; ``GuardedH2Connection`` when ALPN chose ``h2``."""

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            if getattr(self._channel.transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_h2()
                self._negotiatedProtocol = b"h2"
            else:
                self._negotiatedProtocol = b"http/1.1"
        self._channel.dataReceived(data)

    def _switch_to_h2(self) -> None:
        """What Twisted's own channel does on ``h2``, with the guarded connection."""
        old = self._channel
        network = old._networkProducer
        network.unregisterProducer()
        old.setTimeout(None)
        transport = old.transport
        channel = GuardedH2Connection(getattr(self._factory, "reactor", None))
        channel.requestFactory = self._requestFactory
        channel.site = self._site
        channel.factory = self._factory
        channel.timeOut = self._timeOut
        channel.callLater = self._callLater
        # The HTTP/1.1 channel counted this connection among the site's open ones: the h2 one
        # will say when it closes.
        channel._counted, old._counted = getattr(old, "_counted", False), False
        self._channel = channel
        channel.makeConnection(transport)
        network.registerProducer(channel, True)
