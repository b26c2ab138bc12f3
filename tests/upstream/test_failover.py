"""Several CouchDB nodes in --couchdb-url: fail over when one stops answering, come back when it answers.

Two FaultProxy instances (a named fake) stand for two nodes in front of the one
real server, so an outage of a "node" can be made on demand on any server.
Real clusters with real node deaths are in ``test_cluster.py``.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest_twisted
from twisted.internet import reactor

from tests.faultproxy import FaultProxy
from tests.http import fetch
from tests.waiting import wait_until

TOKEN = "failover-token"


@pytest_twisted.async_yield_fixture
async def two_nodes(admin):
    proxies = [FaultProxy(reactor, admin.host, admin.port) for _ in range(2)]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.stop()


def _cluster_url(admin, proxies) -> str:
    creds = (
        f"{quote(admin.user or '', safe='')}:{quote(admin.password or '', safe='')}@" if admin.user else ""
    )
    return ",".join(f"http://{creds}{proxy.url_host}" for proxy in proxies)


def _downloads(proxy: FaultProxy) -> int:
    return sum(1 for t in proxy.targets() if "/f.bin?rev=" in t)


async def _details(service) -> dict:
    health = (await fetch(f"{service.ops_url}/_health")).json()
    metrics = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
    return {"health": health, "metrics": metrics}


@pytest_twisted.ensureDeferred
async def test_downloads_move_to_the_next_node_and_come_back(start_service, admin, db, two_nodes):
    first, second = two_nodes
    admin.put(db, "doc", {"download_token": TOKEN})
    body = bytes(range(256)) * 64
    admin.put_attachment(db, "doc", "f.bin", body, "application/octet-stream")
    service = await start_service(
        couchdb_url=_cluster_url(admin, two_nodes), feed_heartbeat=0.2, blob_cache_bytes=0
    )
    url = service.url(db, "doc", "f.bin", TOKEN)
    for _ in range(3):
        reply = await fetch(url)
        assert (reply.status, reply.body) == (200, body)
    assert _downloads(first) == 3 and _downloads(second) == 0, "the first node is preferred"

    first.outage()  # resets every connection and refuses new ones
    statuses = [(await fetch(url)).status for _ in range(20)]
    assert statuses == [200] * 20
    assert _downloads(second) >= 20
    details = await _details(service)
    assert [n["state"] for n in details["health"]["nodes"]] == ["down", "up"]
    assert details["health"]["status"] == "ok"
    assert "couchtoken_upstream_failovers_total 1.0" in details["metrics"]
    assert all("<credentials>" in n["node"] for n in details["health"]["nodes"])

    first.restore()
    # The down node is asked again in the background and preferred once it answers.
    before = _downloads(first)

    async def back_on_first() -> bool:
        await fetch(url)
        return _downloads(first) > before

    assert await wait_until(back_on_first, 10, interval=0.2)
    assert [n["state"] for n in (await _details(service))["health"]["nodes"]] == ["up", "up"]


@pytest_twisted.ensureDeferred
async def test_a_revoked_token_stops_while_the_first_node_is_down(start_service, admin, db, two_nodes):
    first, _ = two_nodes
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.bin", b"payload", "application/octet-stream")
    service = await start_service(couchdb_url=_cluster_url(admin, two_nodes), feed_heartbeat=0.2)
    url = service.url(db, "doc", "f.bin", TOKEN)
    assert (await fetch(url)).status == 200
    assert await wait_until(lambda: service.app.feeds.connected() == 1, 5)
    first.outage()  # the feed's connection dies with it
    assert (await fetch(url)).status == 200
    revision = admin.get(db, "doc")
    admin.put(db, "doc", {**revision, "download_token": "rotated"})

    async def refused() -> bool:
        return (await fetch(url)).status == 403

    assert await wait_until(refused, 2, interval=0.05)
    assert await wait_until(lambda: service.app.feeds.connected() == 1, 5), "the feed moved to the other node"
    assert (await fetch(service.url(db, "doc", "f.bin", "rotated"))).status == 200


@pytest_twisted.ensureDeferred
async def test_every_node_down_is_a_quick_502_and_health_says_so(start_service, admin, db, two_nodes):
    admin.put(db, "doc", {"download_token": TOKEN})
    service = await start_service(couchdb_url=_cluster_url(admin, two_nodes))
    for proxy in two_nodes:
        proxy.outage()
    reply = await fetch(service.url(db, "doc", "f.bin", TOKEN))
    assert reply.status == 502
    assert (await fetch(f"{service.base_url}/_health")).status == 503
