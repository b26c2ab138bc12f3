"""The public port under ``--workers``: one ``SO_REUSEPORT`` socket per worker, or one they share.

For ``tcp:``, ``tcp6:`` and ``ssl:`` the supervisor binds one listening
socket per worker to the same address with ``SO_REUSEPORT``; the kernel
spreads new connections evenly over them, whichever worker is busy.  A
socket passed in by systemd, or a unix socket, is one socket: every worker
accepts on it, and a new connection goes to whichever worker takes it
first.  Either way the supervisor holds the sockets open, so connections
are queued, not refused, while a worker restarts.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory

from couchtoken.ops.lifecycle import ListeningPort, exit_because_cannot_listen

REUSEPORT_TYPES = ("tcp", "tcp6", "ssl")


class _NoConnections(Factory):
    """The supervisor's factory on a shared socket it never reads: would refuse if it ever did."""

    def buildProtocol(self, addr: Any) -> None:
        return None


class _WhereItWouldListen:
    """A stand-in reactor that records the address an endpoint would listen on, and listens nowhere."""

    address: tuple[int, int, str] | None = None  # port, backlog, interface

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> None:
        self.address = (port, backlog, interface)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> None:
        self.address = (port, backlog, interface)


def tcp_address(description: str) -> tuple[int, int, str]:
    """(port, backlog, interface) of a ``tcp:``, ``tcp6:`` or ``ssl:`` endpoint description."""
    recorder = _WhereItWouldListen()
    serverFromString(recorder, description).listen(_NoConnections())
    if recorder.address is None:
        raise ValueError(f"{description!r} does not listen on TCP")
    return recorder.address


def reuseport_sockets(description: str, count: int) -> list[socket.socket]:
    """``count`` listening sockets on the endpoint's address, with SO_REUSEPORT (a port 0 is chosen once)."""
    port, backlog, interface = tcp_address(description)
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            listener = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((interface, port))
            port = listener.getsockname()[1]
            listener.listen(backlog)
            listener.setblocking(False)
    except OSError:
        for listener in sockets:
            listener.close()
        raise
    return sockets


def spreads_by_reuseport(description: str) -> bool:
    return description.split(":", 1)[0] in REUSEPORT_TYPES and hasattr(socket, "SO_REUSEPORT")


class PublicSockets(Service):
    """Opens the public port for ``count`` workers and hands on one listening fd per worker.

    A port that cannot be opened stops the process with status 1, as
    :class:`ListeningPort` does.
    """

    def __init__(
        self, reactor: Any, description: str, count: int, on_ready: Callable[[list[int]], None]
    ) -> None:
        self._reactor = reactor
        self._description = description
        self._count = count
        self._on_ready = on_ready
        self._sockets: list[socket.socket] = []
        self._shared: ListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if spreads_by_reuseport(self._description):
            try:
                self._sockets = reuseport_sockets(self._description, self._count)
            except OSError as exc:
                exit_because_cannot_listen(self._reactor, self._description, exc.strerror or str(exc))
                return
            self._on_ready([listener.fileno() for listener in self._sockets])
        else:
            endpoint = serverFromString(self._reactor, self._description)
            self._shared = ListeningPort(
                endpoint, _NoConnections(), self._reactor, self._description, on_listening=self._share
            )
            self._shared.privilegedStartService()

    def _share(self, port: Any) -> None:
        port.stopReading()  # the workers accept on it; this process never does
        self._on_ready([port.fileno()] * self._count)

    def startService(self) -> None:
        if not self._sockets and self._shared is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        for listener in self._sockets:
            listener.close()
        self._sockets = []
        if self._shared is not None:
            shared, self._shared = self._shared, None
            return shared.stopService()
        return None
