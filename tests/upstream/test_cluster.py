"""A real 3-node CouchDB cluster behind couchtoken, and the node in use dying (SIGKILL, SIGTERM).

Runs only with ``COUCHTOKEN_TEST_COUCHDB_START`` (``.ci/run`` sets it): three
``start-couchdb`` nodes joined into one cluster (q=2, n=3: every node holds
every shard), the service given all three URLs, the first one preferred.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.couchdb_release import START_ENV, start_cluster
from tests.http import fetch
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.skipif(not os.environ.get(START_ENV), reason=f"needs {START_ENV}"),
    pytest.mark.slow,
]
TOKEN = "cluster-token"
BODY = os.urandom(256 * 1024)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = start_cluster(Path(os.environ[START_ENV]).expanduser(), tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


@pytest.fixture
def cluster_db(cluster):
    """A database with one document and attachment, all three nodes up."""
    for node in cluster.nodes:
        if not node.running:
            node.start()
    cluster.wait_joined()
    admin = cluster.nodes[1].client()
    name = f"ct-cluster-{uuid.uuid4().hex[:8]}"
    admin.create_db(name)
    admin.put(name, "doc", {"download_token": TOKEN})
    admin.put_attachment(name, "doc", "f.bin", BODY, "application/octet-stream")
    yield name
    admin.delete_db(name)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_downloads_survive_the_death_of_the_node_in_use(
    start_service, cluster, cluster_db, signum, capsys
):
    service = await start_service(
        couchdb_url=",".join(cluster.urls), blob_cache_bytes=0, feed_heartbeat=0.5, response_timeout=5
    )
    url = service.url(cluster_db, "doc", "f.bin", TOKEN)
    assert (await fetch(url)).body == BODY
    outcomes: list[tuple[float, float, int]] = []  # (started, ended, status); 0 = broken transfer
    stop_at = time.monotonic() + 8

    async def client() -> None:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                reply = await fetch(url)
                status = reply.status if reply.status != 200 or reply.body == BODY else -1
            except Exception:  # noqa: BLE001 - a cut transfer: counted, judged below
                status = 0
            outcomes.append((started, time.monotonic(), status))

    clients = DeferredList([ensureDeferred(client()) for _ in range(6)])
    await deferLater(reactor, 2)
    killed_at = time.monotonic()
    await deferToThread(cluster.nodes[0].stop, signum)
    await clients
    counts = Counter(status for _, _, status in outcomes)
    with capsys.disabled():
        shown = ", ".join(f"{'cut' if k == 0 else k}={v}" for k, v in sorted(counts.items()))
        print(f"\n[cluster] {signal.Signals(signum).name} of the node in use: {shown}")
    assert counts[-1] == 0, "a 200 with the wrong bytes"
    late = [o for o in outcomes if o[2] != 200 and o[0] > killed_at + 2]
    assert not late, f"failures after the kill: {late[:5]} ({counts})"
    # What failed was in flight around the kill (at most one request per client).
    failed_near = [o for o in outcomes if o[2] != 200]
    assert len(failed_near) <= 6 * 2, counts
    assert counts[200] > 50
    health = (await fetch(f"{service.ops_url}/_health")).json()
    assert [n["state"] for n in health["nodes"]] == ["down", "up", "up"]
    metrics = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
    assert "couchtoken_upstream_failovers_total 1.0" in metrics


@pytest_twisted.ensureDeferred
async def test_a_token_changed_on_a_surviving_node_stops_within_a_second(start_service, cluster, cluster_db):
    service = await start_service(couchdb_url=",".join(cluster.urls), feed_heartbeat=0.5, response_timeout=5)
    url = service.url(cluster_db, "doc", "f.bin", TOKEN)
    assert (await fetch(url)).status == 200
    assert await wait_until(lambda: service.app.feeds.connected() == 1, 10)

    async def answered_from_the_cache() -> bool:
        # The first check under a live feed is stored, the next is answered by it, unless a
        # late, batched global-feed event of the fixture's own writes evicted it in between.
        assert (await fetch(url)).status == 200
        return service.app.documents.hits >= 1

    assert await wait_until(answered_from_the_cache, 10, interval=0.2), "the check was never cached"
    await deferToThread(cluster.nodes[0].kill)
    # The feed (on the dead node) moves; the cache must not vouch for anything meanwhile.
    await deferLater(reactor, 0.5)
    survivor = cluster.nodes[2].client()
    revision = await deferToThread(survivor.get, cluster_db, "doc")
    changed_at = time.monotonic()
    await deferToThread(survivor.put, cluster_db, "doc", {**revision, "download_token": "rotated"})

    async def refused() -> bool:
        return (await fetch(url)).status == 403

    assert await wait_until(refused, 5, interval=0.02)
    # The cluster has _global_changes: the database is covered by the global feed, whose events
    # CouchDB batches (~1 s), so its bound is 2 s; a feed of its own would make it 1 s.
    bound = 2.0 if service.app.feeds.mode == "global" else 1.0
    assert time.monotonic() - changed_at < bound + 0.5  # plus the blocking PUT's own time
    assert (await fetch(service.url(cluster_db, "doc", "f.bin", "rotated"))).status == 200
    feeds = service.app.feeds
    expected = len(feeds.feeds()) + (1 if feeds.mode == "global" else 0)
    assert await wait_until(lambda: feeds.connected() == expected >= 1, 10), "the feeds live on other nodes"
