"""Chaos load test: 50 clients download while tokens rotate, documents vanish and return,
and the CouchDB server restarts.  Zero wrong answers allowed.

Pass criteria: every 200 body byte-exact; no download granted with a token
more than 1 s after the write that replaced it was acknowledged; no 500;
service RSS at the end within 64 MiB of its value after warm-up; every feed
connected again at the end.  ``COUCHTOKEN_CHAOS_SECONDS`` sets the length
(default 60).
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections import Counter

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from couchtoken.dev.pouchdb import free_port
from tests.twistproc import TwistProcess, rss_bytes

SECONDS = float(os.environ.get("COUCHTOKEN_CHAOS_SECONDS", "60"))
CLIENTS = 50
DATABASES, DOCS = 4, 5
GRACE = 1.0  # seconds a replaced token may still be honoured


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chaos(couch_server, tmp_path, capsys):
    if not couch_server.restartable:
        pytest.skip("restarts only a server the tests started")
    admin = couch_server.admin
    rng = random.Random(1234)
    run = uuid.uuid4().hex[:6]
    dbs = [f"ct-chaos-{run}-{i}" for i in range(DATABASES)]
    content = {}
    tokens: dict[tuple[str, str], list[list]] = {}  # key -> [[token, replaced_at or None], ...]

    def store(db: str, doc: str) -> None:
        token = uuid.uuid4().hex
        admin.put(db, doc, {"download_token": token})
        for name in ("small.bin", "large.bin"):
            admin.put_attachment(db, doc, name, content[(db, doc, name)])
        tokens.setdefault((db, doc), []).append([token, None])

    for db in dbs:
        admin.create_db(db)
        for d in range(DOCS):
            doc = f"doc{d}"
            content[(db, doc, "small.bin")] = os.urandom(4096)
            content[(db, doc, "large.bin")] = os.urandom(rng.choice([256, 512, 1024]) * 1024)
            store(db, doc)

    metrics_port = free_port()
    service = TwistProcess(
        tmp_path / "twist.log",
        [
            "--feed-heartbeat",
            "0.5",
            "--max-downloads",
            "5000",
            "--max-failures",
            "0",
            "--metrics-port",
            f"tcp:{metrics_port}:interface=127.0.0.1",
        ],
        env={"COUCHDB_URL": couch_server.url},
    )
    service.start()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = CLIENTS
    agent = Agent(reactor, pool=pool)
    counts: Counter[str] = Counter()
    problems: list[str] = []
    stop_at = [0.0]

    async def get(url: str) -> tuple[int, bytes]:
        response = await agent.request(b"GET", url.encode())
        return response.code, await treq.content(response)

    async def client(number: int) -> None:
        local = random.Random(number)
        while time.monotonic() < stop_at[0]:
            db, doc = local.choice(dbs), f"doc{local.randrange(DOCS)}"
            name = local.choice(["small.bin", "small.bin", "large.bin"])
            history = tokens[(db, doc)]
            token, replaced_at = history[-1] if local.random() < 0.8 else local.choice(history)
            started = time.monotonic()
            try:
                status, body = await get(f"{service.base_url}/{db}/{doc}/{name}?token={token}")
            except Exception as exc:  # noqa: BLE001 - a broken connection during chaos is allowed
                counts["broken"] += 1
                counts[f"broken:{type(exc).__name__}"] += 1
                continue
            counts["requests"] += 1
            counts[str(status)] += 1
            if status >= 500 and status not in (502, 503, 504):
                problems.append(f"{status} for {db}/{doc}/{name}")
            if status == 200:
                if body != content[(db, doc, name)]:
                    problems.append(f"wrong body for {db}/{doc}/{name} ({len(body)} bytes)")
                if replaced_at is not None and started > replaced_at + GRACE:
                    counts["stale"] += 1
                    problems.append(f"stale grant {started - replaced_at:.2f}s after rotation of {db}/{doc}")

    def rotate(db: str, doc: str) -> None:
        current = admin.get(db, doc)
        token = uuid.uuid4().hex
        admin.put(
            db, doc, {**{k: v for k, v in (current or {}).items() if k != "_rev"}, "download_token": token}
        )
        now = time.monotonic()
        for entry in tokens[(db, doc)]:
            entry[1] = entry[1] or now
        tokens[(db, doc)].append([token, None])

    def delete_and_recreate(db: str, doc: str) -> None:
        admin.delete(db, doc)
        now = time.monotonic()
        for entry in tokens[(db, doc)]:
            entry[1] = entry[1] or now
        time.sleep(0.2)
        store(db, doc)

    async def driver() -> None:
        restarted = False
        while time.monotonic() < stop_at[0] - 1:
            db, doc = rng.choice(dbs), f"doc{rng.randrange(DOCS)}"
            try:
                if not restarted and time.monotonic() > stop_at[0] - SECONDS / 2:
                    restarted = True
                    await threads.deferToThread(couch_server.restart, 1.0)
                    counts["restarts"] += 1
                elif rng.random() < 0.15:
                    await threads.deferToThread(delete_and_recreate, db, doc)
                    counts["recreations"] += 1
                else:
                    await threads.deferToThread(rotate, db, doc)
                    counts["rotations"] += 1
            except Exception as exc:  # noqa: BLE001 - writes may fail while the server restarts
                counts[f"driver:{type(exc).__name__}"] += 1
            await deferLater(reactor, 0.1)

    try:
        # Warm up: every document once, then take the baseline RSS.
        stop_at[0] = time.monotonic() + 5
        await DeferredList([ensureDeferred(client(n)) for n in range(CLIENTS)])
        baseline = rss_bytes(service.process.pid)
        counts.clear()
        stop_at[0] = time.monotonic() + SECONDS
        await DeferredList([ensureDeferred(driver())] + [ensureDeferred(client(n)) for n in range(CLIENTS)])
        feeds_ok = False
        for _ in range(100):
            status, body = await get(f"http://127.0.0.1:{metrics_port}/_health")
            health = json.loads(body)
            if status == 200 and health["feeds"]["connected"] == health["feeds"]["total"]:
                feeds_ok = True
                break
            await deferLater(reactor, 0.2)
        end_rss = rss_bytes(service.process.pid)
    finally:
        await pool.closeCachedConnections()
        service.stop()
        for db in dbs:
            admin.delete_db(db)
    with capsys.disabled():
        shown = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        print(
            f"\n[chaos] {SECONDS:.0f}s, {CLIENTS} clients: {shown}; "
            f"RSS {baseline / 2**20:.1f} -> {end_rss / 2**20:.1f} MiB; feeds connected: {feeds_ok}"
        )
    assert not problems, problems[:10]
    assert counts["200"] > 1000
    assert counts["restarts"] == 1
    assert end_rss - baseline < 64 * 2**20
    assert feeds_ok, health
