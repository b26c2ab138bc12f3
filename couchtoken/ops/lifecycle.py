"""The services that start and stop a running couchtoken: ports, drain, SIGTERM, the client."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from couchtoken.ops.settings import Settings
from couchtoken.upstream.client import CouchDBClient
from couchtoken.web.inflight import InFlight

_log = Logger()
_STARTUP_BACKOFF = backoffPolicy(initialDelay=1.0, maxDelay=30.0)


class CouchDBClientService(Service):
    """Logs the configuration at start and whether CouchDB answers; closes pooled connections at stop.

    A CouchDB that does not answer at start gets one warning; it is asked
    again with backoff (the service runs meanwhile) until it answers, which
    is logged once too.
    """

    def __init__(self, client: CouchDBClient, settings: Settings, clock: Any) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._checking: Deferred[None] | None = None
        self._retry: Any = None
        self.first_check: Deferred[None] = Deferred()  # fires once CouchDB has been asked at start

    def startService(self) -> None:
        super().startService()
        _log.info("couchtoken starting: {settings}", settings=self._settings.describe())
        self._check(attempt=0)

    def _check(self, attempt: int) -> None:
        self._retry = None
        self._checking = Deferred.fromCoroutine(self._probe(attempt))

    async def _probe(self, attempt: int) -> None:
        problem = await self._client.probe(self._settings.connect_timeout)
        self._checking = None
        if not self.first_check.called:
            self.first_check.callback(None)
        if not self.running:
            return
        if problem is None:
            if attempt:
                _log.info("CouchDB at {couchdb} answers now", couchdb=self._settings.couchdb)
            return
        if not attempt:
            _log.warn(
                "CouchDB at {couchdb} does not answer ({problem}); downloads fail with 502/504 "
                "until it does. Retrying in the background.",
                couchdb=self._settings.couchdb,
                problem=problem,
            )
        self._retry = self._clock.callLater(_STARTUP_BACKOFF(attempt + 1), self._check, attempt + 1)

    def stopService(self) -> Any:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._checking is not None:
            self._checking.cancel()
        return self._client.close()


class DrainService(Service):
    """Stopped after the listening port: lets running downloads finish (``--drain-timeout``)."""

    def __init__(self, in_flight: InFlight, timeout: float) -> None:
        self._in_flight = in_flight
        self._timeout = timeout

    def stopService(self) -> Any:
        super().stopService()
        return self._in_flight.drain(self._timeout)


class ExitCleanlyOnSigterm(Service):
    """SIGTERM stops the reactor (so the drain runs) and the process exits 0.

    Twisted's own handler makes the process die by the signal after shutdown;
    a drained, orderly stop should end with status 0.  Installed once the
    reactor runs, after Twisted has installed its own handlers.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._terminate)

    def _terminate(self, signum: int, frame: object) -> None:
        _log.info("Received SIGTERM: closing the ports and draining downloads")
        self._reactor.callFromThread(self._reactor.stop)


class ListeningPort(Service):
    """Listens on an endpoint; one that cannot be opened stops the process with status 1.

    (Twisted's StreamServerEndpointService only logs the failure and runs on
    without a port; systemd's Restart=on-failure needs the process to exit.)
    """

    def __init__(
        self,
        endpoint: Any,
        factory: Any,
        reactor: Any,
        description: str,
        on_listening: Callable[[Any], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._reactor = reactor
        self._description = description
        self._on_listening = on_listening
        self._listening: Any = None
        self._port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listening = self._endpoint.listen(self._factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        return None

    def _listened(self, port: Any) -> None:
        self._port = port
        if self._on_listening is not None:
            self._on_listening(port)

    def _failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return
        exit_because_cannot_listen(self._reactor, self._description, failure.getErrorMessage())


def exit_because_cannot_listen(reactor: Any, description: str, why: str) -> None:
    """Log why a port cannot be opened, and stop the process with status 1."""
    _log.critical("Cannot listen on {port}: {why}", port=description, why=why)
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    reactor.callWhenRunning(reactor.stop)
