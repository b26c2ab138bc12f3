"""A fake: a TCP proxy that records what reaches CouchDB and injects network faults.

It sits between the service and the real CouchDB-compatible server.  It is
only for what a real server cannot do on demand (a connection reset, a stall,
a body cut in half, garbage instead of HTTP); everything else the tests check
against the real server behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from tests.waiting import wait_until


@attrs.define
class RecordedRequest:
    method: str
    target: str
    headers: dict[str, str]
    connection: int


@attrs.define
class Fault:
    """What to do to requests whose target ``matches``.

    kinds: ``garbage`` (answer bytes that are not HTTP), ``stall`` (never
    answer), ``reset`` (drop the connection), ``cut`` (forward, then drop
    the connection after ``after`` bytes of the response), ``inject`` (add
    raw ``headers`` lines to the response), ``delay`` (hold the request
    ``seconds`` before forwarding it), ``stall-after-headers`` (forward the
    response head, then nothing), ``throttle`` (pass the response on at
    ``rate`` bytes a second).
    """

    kind: str
    matches: Callable[[str], bool] = lambda target: True
    after: int = 0
    headers: bytes = b""
    seconds: float = 0.0
    rate: int = 0


class _ToUpstream(protocol.Protocol):
    def __init__(self, downstream: _FromService) -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.downstream.from_upstream(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.downstream.upstream_lost()


class _FromService(protocol.Protocol):
    def __init__(self, proxy: FaultProxy, number: int) -> None:
        self.proxy = proxy
        self.number = number
        self.upstream: _ToUpstream | None = None
        self.pending: list[bytes] = []
        self.parse_buffer = b""
        self.open = True
        self.cut_remaining: int | None = None
        self.swallow = False
        self.inject = b""
        self.delay = 0.0
        self.held: list[bytes] | None = None
        self.stall_after_head = False
        self.head_seen = b""
        self.rate = 0
        self.throttled = b""
        self.trickling = False
        self.received = 0  # bytes that came from the server on this connection

    def connectionMade(self) -> None:
        self.proxy.connections.append(self)
        self.proxy.opened()
        if self.proxy.down:
            self.open = False
            self.proxy.closed()
            self.transport.abortConnection()
            return
        endpoint = TCP4ClientEndpoint(self.proxy.reactor, self.proxy.upstream_host, self.proxy.upstream_port)
        connectProtocol(endpoint, _ToUpstream(self)).addErrback(lambda _: self.transport.abortConnection())

    def dataReceived(self, data: bytes) -> None:
        self.parse_buffer += data
        while b"\r\n\r\n" in self.parse_buffer:
            head, self.parse_buffer = self.parse_buffer.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.proxy.requests.append(RecordedRequest(method, target, headers, self.number))
            fault = self.proxy.fault
            if fault is not None and fault.matches(target):
                self.apply(fault)
        if self.swallow:
            return
        if self.delay:
            self.held = []
            self.proxy.reactor.callLater(self.delay, self._release)
            self.delay = 0.0
        if self.held is not None:
            self.held.append(data)
            return
        self._forward(data)

    def apply(self, fault: Fault) -> None:
        if fault.kind == "garbage":
            self.swallow = True
            self.transport.write(b"THIS IS NOT HTTP\r\n\r\n")
            self.transport.loseConnection()
        elif fault.kind == "stall":
            self.swallow = True
        elif fault.kind == "reset":
            self.swallow = True
            self.transport.abortConnection()
        elif fault.kind == "cut":
            self.cut_remaining = fault.after
        elif fault.kind == "inject":
            self.inject = fault.headers
        elif fault.kind == "delay":
            self.delay = fault.seconds
        elif fault.kind == "stall-after-headers":
            self.stall_after_head = True
        elif fault.kind == "throttle":
            self.rate = fault.rate

    def _trickle(self) -> None:
        """Pass on a tenth of a second's worth of throttled bytes, then wait a tenth of a second."""
        if not self.open or not self.throttled:
            self.trickling = False
            return
        step = max(1, self.rate // 10)
        data, self.throttled = self.throttled[:step], self.throttled[step:]
        self.transport.write(data)
        # Keep the 0.1 s cadence even when the buffer ran dry: bytes that arrive in small
        # chunks (CouchDB sends <= 8 KiB at a time) must not pass unthrottled.
        self.proxy.reactor.callLater(0.1, self._trickle)

    def _release(self) -> None:
        held, self.held = self.held or [], None
        for data in held:
            self._forward(data)

    def _forward(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    async def closes_within(self, seconds: float) -> bool:
        """Wait until this connection is closed; False if it is still open after ``seconds``."""
        return await wait_until(lambda: not self.open, seconds)

    def upstream_connected(self, upstream: _ToUpstream) -> None:
        self.upstream = upstream
        if not self.open:
            upstream.transport.loseConnection()
            return
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []

    def from_upstream(self, data: bytes) -> None:
        self.received += len(data)
        if self.swallow:
            return
        if self.stall_after_head:
            self.head_seen += data
            if b"\r\n\r\n" in self.head_seen:
                head = self.head_seen.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                self.transport.write(head)
                self.swallow = True
            return
        if self.rate:
            if not self.trickling:
                self.trickling = True
                self.proxy.reactor.callLater(0, self._trickle)
            self.throttled += data
            return
        if self.inject and b"\r\n" in data:
            status_line, rest = data.split(b"\r\n", 1)
            data = status_line + b"\r\n" + self.inject + rest
            self.inject = b""
        if self.cut_remaining is not None:
            data = data[: self.cut_remaining]
            self.cut_remaining -= len(data)
            self.transport.write(data)
            if self.cut_remaining == 0:
                self.swallow = True
                # A FIN after the bytes, not a reset: a reset would discard them in flight.
                self.transport.loseConnection()
                if self.upstream is not None:
                    self.upstream.transport.abortConnection()
            return
        self.transport.write(data)

    def upstream_lost(self) -> None:
        if self.open and not self.swallow:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.open:
            self.proxy.closed()
        self.open = False
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class _Factory(protocol.Factory):
    noisy = False

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.count = 0

    def buildProtocol(self, addr: Any) -> _FromService:
        self.count += 1
        return _FromService(self.proxy, self.count)


class FaultProxy:
    """Listen on a loopback port and forward to ``upstream_host:upstream_port``."""

    def __init__(self, reactor: Any, upstream_host: str, upstream_port: int) -> None:
        self.reactor = reactor
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.requests: list[RecordedRequest] = []
        self.connections: list[_FromService] = []
        self.fault: Fault | None = None
        self.down = False
        self._port: Any = None
        self.open_now = 0  # connections from the service open at this moment
        self.peak_open = 0  # the most that were ever open at once

    def opened(self) -> None:
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)

    def closed(self) -> None:
        self.open_now -= 1

    async def start(self) -> int:
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(_Factory(self))
        return self._port.getHost().port

    @property
    def url_host(self) -> str:
        return f"127.0.0.1:{self._port.getHost().port}"

    async def stop(self) -> None:
        if self._port is not None:
            await self._port.stopListening()
        for connection in self.connections:
            if connection.open:
                connection.transport.abortConnection()

    def outage(self) -> None:
        """Cut every connection and refuse new ones, until ``restore``."""
        self.down = True
        for connection in self.open_connections():
            connection.transport.abortConnection()

    def restore(self) -> None:
        self.down = False

    def silence(self, fragment: str) -> None:
        """Stop passing bytes on the open connections that carried ``fragment``, without closing them."""
        for connection in self.connections_for(fragment):
            connection.swallow = True

    def open_connections(self) -> list[_FromService]:
        return [c for c in self.connections if c.open]

    def targets(self) -> list[str]:
        return [f"{r.method} {r.target}" for r in self.requests]

    def connections_for(self, fragment: str) -> list[_FromService]:
        """The connections that carried a request whose target contains ``fragment``."""
        numbers = sorted({r.connection for r in self.requests if fragment in r.target})
        return [self.connections[n - 1] for n in numbers]
