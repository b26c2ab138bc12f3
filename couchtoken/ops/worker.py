"""One of the processes ``--workers N`` starts: serves on sockets its supervisor opened.

The supervisor (``couchtoken.ops.workers``) starts each worker with every
listening socket it holds (fds 3 and up) and then writes one line to the
worker's stdin saying which slot it takes: which fd is its public port and
which its private unix socket for ``/_metrics`` and ``/_health`` (which the
supervisor scrapes).  The worker closes the others.  Until that line comes
the process waits with its imports done: the spare that replaces a worker
that died.  Socket paths belong to the supervisor; a worker never unlinks
them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import tcp, unix
from twisted.internet.defer import succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from couchtoken.ops.lifecycle import ExitCleanlyOnSigterm, ListeningPort
from couchtoken.ops.services import build
from couchtoken.ops.settings import Settings

FIRST_INHERITED_FD = 3

_log = Logger()


@attrs.frozen
class Assignment:
    """The supervisor's word to a waiting worker: its slot, and which inherited fds are its own."""

    slot: int
    public_fd: int
    ops_fd: int
    inherited: tuple[int, ...]

    def encode(self) -> bytes:
        return json.dumps(attrs.asdict(self)).encode("ascii") + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Assignment:
        fields = json.loads(line)
        return cls(fields["slot"], fields["public_fd"], fields["ops_fd"], tuple(fields["inherited"]))


def wait_for_assignment(stdin: Any = None) -> Assignment | None:
    """Block until the supervisor names this worker's slot; None when it stops first (or is gone)."""
    line = (sys.stdin.buffer if stdin is None else stdin).readline()
    if not line.strip():
        return None
    assignment = Assignment.decode(line)
    for fd in assignment.inherited:
        if fd not in (assignment.public_fd, assignment.ops_fd):
            os.close(fd)
    return assignment


def share_of(budget: int, workers: int) -> int:
    """A per-client budget divided among the workers: ceil(budget / workers); 0 (no limit) stays 0."""
    return math.ceil(budget / workers) if budget > 0 else 0


def worker_settings(settings: Settings, workers: int) -> Settings:
    """The settings of one worker of ``workers``: per-client budgets divided among them.

    A client's connections may land on any worker, and each worker counts
    alone, so each gets ceil(budget / N): a guesser spreading over every
    worker gets at most N * ceil(budget / N) failures a minute.
    """
    return attrs.evolve(
        settings,
        max_failures=share_of(settings.max_failures, workers),
        max_client_failures=share_of(settings.max_client_failures, workers),
    )


class _BorrowedUNIXPort(unix.Port):
    """A unix socket passed in by the supervisor: closing it leaves the path to its owner."""

    def connectionLost(self, reason: Any) -> None:
        if self.lockFile is not None:
            self.lockFile.unlock()
        tcp.Port.connectionLost(self, reason)


class _AdoptingReactor:
    """Turns an endpoint's ``listenTCP``/``listenSSL`` into adopting an inherited socket.

    Parsing the ``--port`` description through it gives the same protocol
    stack the endpoint would build (TLS for ``ssl:``) on the socket the
    supervisor opened, without binding anything.
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return self._reactor.adoptStreamPort(self._fd, self._family, factory)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        return self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory))


def _family_of(fd: int) -> int:
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


def _shared(fd: int) -> bool:
    """Whether the listening socket is shared with the other workers (not this worker's SO_REUSEPORT own)."""
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return not probe.getsockopt(
            socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 0) or socket.SO_REUSEADDR
        )
    finally:
        probe.close()


def accept_one_at_a_time(port: Any) -> Any:
    """Make a listening port on a shared socket accept one connection per wake-up instead of a burst.

    Every worker wakes for a new connection on a shared socket; Twisted's
    port would accept all waiting connections at once (up to 100), so a
    burst of connections (a client opening its keep-alive pool) lands on
    one worker.  One at a time, a worker busy serving leaves the next
    connection to one that is free (nginx's ``multi_accept off``).
    (``numberAccepts`` is the port's own knob, which it grows after a full
    burst: it is set back before each read.)
    """
    read = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = doRead
    return port


@implementer(IStreamServerEndpoint)
class InheritedSocketEndpoint:
    """Listens on an inherited listening socket, wrapped the way ``description`` says (TLS or not)."""

    def __init__(self, reactor: Any, fd: int, description: str) -> None:
        self._reactor = reactor
        self._fd = fd
        self._description = description

    def listen(self, factory: Any) -> Any:
        try:
            family = _family_of(self._fd)
            spread = (lambda port: port) if not _shared(self._fd) else accept_one_at_a_time
            if family == socket.AF_UNIX:
                port = _BorrowedUNIXPort._fromListeningDescriptor(self._reactor, self._fd, factory)
                port.startListening()
            elif self._description.startswith("systemd:"):
                port = self._reactor.adoptStreamPort(self._fd, family, factory)
            else:
                adopting = _AdoptingReactor(self._reactor, self._fd, family)
                return serverFromString(adopting, self._description).listen(factory).addCallback(spread)
            return succeed(spread(port))
        finally:
            os.close(self._fd)  # adopting duplicated it


class WorkerOfSupervisor(Service):
    """Logs the worker's start and stops it when its supervisor is gone."""

    def __init__(self, reactor: Any, slot: int, settings: Settings, check_every: float = 1.0) -> None:
        self._reactor = reactor
        self._slot = slot
        self._settings = settings
        self._parent = os.getppid()
        self._watch = LoopingCall(self._check_parent)
        self._watch.clock = reactor
        self._check_every = check_every

    def startService(self) -> None:
        super().startService()
        _log.info(
            "Worker {worker} (pid {pid}) starting; guess throttling: {failures} failed checks "
            "a minute per client on this worker",
            worker=self._slot,
            pid=os.getpid(),
            failures=self._settings.max_failures or "no limit",
        )
        self._watch.start(self._check_every, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._watch.running:
            self._watch.stop()

    def _check_parent(self) -> None:
        if os.getppid() != self._parent:
            _log.warn("Worker {worker}: the supervisor is gone; stopping", worker=self._slot)
            self._watch.stop()
            self._reactor.callWhenRunning(self._reactor.stop)


def make_worker_service(
    settings: Settings, port_description: str, workers: int, reactor: Any
) -> MultiService:
    """Wait for a slot, then the service tree of the worker in it: the download service on its sockets.

    (Started through ``couchtoken.ops.twist_worker``, the process ignores
    SIGINT: the supervisor decides when workers stop.)
    """
    assignment = wait_for_assignment()
    if assignment is None:
        raise SystemExit(0)
    settings = worker_settings(settings, workers)
    parts = build(settings, reactor, metrics_on_public_port=False)
    WorkerOfSupervisor(reactor, assignment.slot, settings).setServiceParent(parts.service)
    for fd, site, description in (
        (assignment.public_fd, parts.site, port_description),
        (assignment.ops_fd, parts.ops_site, f"worker {assignment.slot} metrics socket"),
    ):
        endpoint = InheritedSocketEndpoint(reactor, fd, port_description)
        ListeningPort(endpoint, site, reactor, description).setServiceParent(parts.service)
    ExitCleanlyOnSigterm(reactor).setServiceParent(parts.service)
    return parts.service
