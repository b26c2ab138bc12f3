"""Shared fixtures: a real CouchDB-compatible server, fresh databases, the service.

By default a PouchDB Server (``tests/node_modules``, pinned by
``tests/package-lock.json``) is started on a free loopback port with an admin
account.  With ``COUCHTOKEN_TEST_COUCHDB_URL=http://admin:pass@host:5984`` the
suite runs against that server (a real Apache CouchDB) and starts none.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher

from couchtoken.dev.pouchdb import CouchAdmin, PouchDBServer
from couchtoken.ops.services import Couchtoken, build
from couchtoken.ops.settings import Settings
from couchtoken.upstream.server import CouchDBServer
from tests.faultproxy import FaultProxy
from tests.http import fetch, service_url

COUCHDB_ENV = "COUCHTOKEN_TEST_COUCHDB_URL"


@attrs.define
class CouchServer:
    """The server under the tests: its admin URL, and the PouchDB process if we run it."""

    url: str
    pouchdb: PouchDBServer | None

    @property
    def admin(self) -> CouchAdmin:
        return CouchAdmin(self.url)


@pytest.fixture(scope="session")
def couch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CouchServer]:
    url = os.environ.get(COUCHDB_ENV)
    if url:
        yield CouchServer(url=url, pouchdb=None)
        return
    server = PouchDBServer(tmp_path_factory.mktemp("pouchdb"))
    server.start()
    try:
        yield CouchServer(url=server.url, pouchdb=server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def admin(couch_server: CouchServer) -> CouchAdmin:
    return couch_server.admin


@pytest.fixture
def db(admin: CouchAdmin) -> Iterator[str]:
    """A fresh, empty database, deleted afterwards."""
    name = f"ct-{uuid.uuid4().hex[:12]}"
    admin.create_db(name)
    yield name
    admin.delete_db(name)


@attrs.define
class RunningService:
    """The couchtoken service, in-process on a real listening port."""

    base_url: str
    proxy: FaultProxy | None
    app: Couchtoken
    port: Any

    def url(self, db: str, docid: str, attachment: str, token: str | None = None, **query: str) -> str:
        return service_url(self.base_url, db, docid, attachment, token, **query)

    def couchdb_targets(self) -> list[str]:
        """What reached CouchDB so far, as ``METHOD target`` lines."""
        assert self.proxy is not None
        return self.proxy.targets()

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        return await fetch(*args, **kwargs)


class ServiceStarter:
    """Starts services (through a recording FaultProxy unless ``couchdb_url`` is given), stops them all."""

    def __init__(self, couch_server: CouchServer) -> None:
        self._couch_server = couch_server
        self.running: list[RunningService] = []

    async def start(self, couchdb_url: str | None = None, **options: Any) -> RunningService:
        proxy = None
        if couchdb_url is None:
            admin = self._couch_server.admin
            proxy = FaultProxy(global_reactor, admin.host, admin.port)
            await proxy.start()
            creds = f"{quote(admin.user or '', safe='')}:{quote(admin.password or '', safe='')}@"
            couchdb_url = f"http://{creds if admin.user else ''}{proxy.url_host}"
        # Every test client is 127.0.0.1: guess throttling only where a test turns it on.
        options.setdefault("max_failures", 0)
        settings = Settings(couchdb=CouchDBServer.from_url(couchdb_url), **options)
        app = build(settings, global_reactor)
        app.service.startService()
        endpoint = TCP4ServerEndpoint(global_reactor, 0, backlog=1024, interface="127.0.0.1")
        port = await endpoint.listen(app.site)
        service = RunningService(
            base_url=f"http://127.0.0.1:{port.getHost().port}", proxy=proxy, app=app, port=port
        )
        self.running.append(service)
        return service

    async def stop(self, service: RunningService) -> None:
        """Stop one service now, the way a process stops (a restart test starts another)."""
        self.running.remove(service)
        await service.port.stopListening()
        await service.app.service.stopService()
        if service.proxy is not None:
            await service.proxy.stop()

    async def stop_all(self) -> None:
        for service in list(self.running):
            await self.stop(service)


@pytest.fixture
def service_starter(couch_server: CouchServer) -> Iterator[ServiceStarter]:
    """Starts services (``.start(**settings)``), stops one (``.stop``), stops all after the test."""
    starter = ServiceStarter(couch_server)
    yield starter
    pytest_twisted.blockon(ensureDeferred(starter.stop_all()))


@pytest.fixture
def start_service(service_starter: ServiceStarter) -> Any:
    """``await start_service(**settings)``: a running service, stopped after the test."""
    return service_starter.start


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted while the test runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.async_fixture
async def service(start_service: Any) -> AsyncIterator[RunningService]:
    return await start_service()
