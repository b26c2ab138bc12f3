"""Shared fixtures: a real CouchDB-compatible server, fresh databases, the service.

The server under the tests (``couch_server.kind``) is one of three:

- ``"pouchdb"`` (the default): a PouchDB Server (``tests/node_modules``, pinned by
  ``tests/package-lock.json``) started on a free loopback port with an admin account;
- ``"couchdb"``: with ``COUCHTOKEN_TEST_COUCHDB_START=/path/to/start-couchdb`` (see
  ``../shared/couchdb/README.md``), a real Apache CouchDB 3.5 single node started from
  the release in a temporary directory, on free ports, with a random admin password
  (``tests/couchdb_release.py``);
- ``"url"``: with ``COUCHTOKEN_TEST_COUCHDB_URL=http://admin:pass@host:5984``, that
  server (a real Apache CouchDB), started by someone else: the suite starts none, and
  tests that restart the server skip.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal
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
from couchtoken.upstream.server import CouchDBCluster
from tests.couchdb_release import START_ENV, CouchDBRelease
from tests.faultproxy import FaultProxy
from tests.http import fetch, service_url

# The service asks these at start and for /_health: not part of any download.
HEALTH_CHECKS = ("GET /_up", "GET /")
COUCHDB_ENV = "COUCHTOKEN_TEST_COUCHDB_URL"
COUCHDB_START_ENV = START_ENV  # "COUCHTOKEN_TEST_COUCHDB_START"

ServerKind = Literal["pouchdb", "couchdb", "url"]
_DATABASE_INFO = re.compile(r"GET /(?!_)[^/?]+\Z")


def is_feed_traffic(target: str) -> bool:
    """Whether ``METHOD target`` keeps the feeds going (no download makes it)."""
    return (
        "/_changes?" in target or target.startswith("GET /_db_updates?") or bool(_DATABASE_INFO.match(target))
    )


@attrs.define
class CouchServer:
    """The server under the tests: its admin URL, its kind, and its process if the tests run it."""

    url: str
    kind: ServerKind
    pouchdb: PouchDBServer | None = None
    couchdb: CouchDBRelease | None = None

    @property
    def admin(self) -> CouchAdmin:
        return CouchAdmin(self.url)

    @property
    def restartable(self) -> bool:
        """Whether the tests started the server, so :meth:`restart` can restart it."""
        return self.kind != "url"

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server cleanly, stay down ``downtime`` seconds, start it again on the same data.

        Same port, same admin account.  Blocking: from the reactor, run it in a thread.
        """
        if self.pouchdb is not None:
            self.pouchdb.stop()
            time.sleep(downtime)
            self.pouchdb.start()
        elif self.couchdb is not None:
            self.couchdb.restart(downtime)
        else:
            raise RuntimeError(f"cannot restart a server the tests did not start ({self.kind})")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a confusing server choice before any test runs."""
    start_script = os.environ.get(COUCHDB_START_ENV)
    if start_script and os.environ.get(COUCHDB_ENV):
        raise pytest.UsageError(f"set {COUCHDB_ENV} or {COUCHDB_START_ENV}, not both")
    if start_script and not Path(start_script).expanduser().is_file():
        raise pytest.UsageError(f"{COUCHDB_START_ENV}={start_script}: no such file")


@pytest.fixture(scope="session")
def couch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CouchServer]:
    url = os.environ.get(COUCHDB_ENV)
    start_script = os.environ.get(COUCHDB_START_ENV)
    if url:
        yield CouchServer(url=url, kind="url")
        return
    if start_script:
        couchdb = CouchDBRelease(Path(start_script).expanduser(), tmp_path_factory.mktemp("couchdb"))
        couchdb.start()
        try:
            couchdb.setup_for_tests()
            yield CouchServer(url=couchdb.url, kind="couchdb", couchdb=couchdb)
        finally:
            couchdb.stop()
        return
    server = PouchDBServer(tmp_path_factory.mktemp("pouchdb"))
    server.start()
    try:
        yield CouchServer(url=server.url, kind="pouchdb", pouchdb=server)
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
    ops_port: Any  # what --metrics-port serves: /_metrics and /_health with details

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port.getHost().port}"

    def url(self, db: str, docid: str, attachment: str, token: str | None = None, **query: str) -> str:
        return service_url(self.base_url, db, docid, attachment, token, **query)

    def couchdb_targets(self, health_checks: bool = False, feeds: bool = False) -> list[str]:
        """What reached CouchDB so far, as ``METHOD target`` lines.

        Health checks and feed traffic (``_changes`` and ``_db_updates`` feeds, database
        checks, baselines and catch-up reads, which no download makes) only if asked.
        """
        assert self.proxy is not None
        targets = self.proxy.targets()
        if not health_checks:
            targets = [t for t in targets if t not in HEALTH_CHECKS]
        if not feeds:
            targets = [t for t in targets if not is_feed_traffic(t)]
        return targets

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
        settings = Settings(couchdb=CouchDBCluster.from_urls(couchdb_url), **options)
        app = build(settings, global_reactor)
        app.service.startService()
        await app.startup.first_check  # the start-up check of CouchDB is done before a test injects faults
        endpoint = TCP4ServerEndpoint(global_reactor, 0, backlog=1024, interface="127.0.0.1")
        port = await endpoint.listen(app.site)
        ops_port = await TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1").listen(app.ops_site)
        service = RunningService(
            base_url=f"http://127.0.0.1:{port.getHost().port}",
            proxy=proxy,
            app=app,
            port=port,
            ops_port=ops_port,
        )
        self.running.append(service)
        return service

    async def stop(self, service: RunningService) -> None:
        """Stop one service now, the way a process stops (a restart test starts another)."""
        self.running.remove(service)
        await service.port.stopListening()
        await service.ops_port.stopListening()
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
