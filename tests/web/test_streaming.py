"""Streaming with backpressure: flat memory for slow clients, released upstreams, aborted failures."""

from __future__ import annotations

import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.web.client import ResponseFailed

from tests.faultproxy import Fault
from tests.http import fetch, start_download
from tests.twistproc import TwistProcess, rss_bytes

TOKEN = "tok"
BIG = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def big_attachment(admin):
    """A database with one 64 MiB attachment (storing it takes PouchDB a while: once per module)."""
    name = f"ct-big-{os.getpid()}"
    admin.create_db(name)
    admin.put(name, "movie", {"download_token": TOKEN})
    admin.put_attachment(name, "movie", "movie.bin", os.urandom(BIG), "video/mp4")
    yield name
    admin.delete_db(name)


def _read_slowly(sock: socket.socket, rate: int, seconds: float) -> int:
    """Read at about ``rate`` bytes per second for ``seconds``; returns bytes read."""
    got = 0
    step = 0.05
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += len(sock.recv(int(rate * step)))
        time.sleep(step)
    return got


@pytest.mark.slow
def test_a_slow_client_keeps_the_service_memory_flat(big_attachment, couch_server, tmp_path, capsys):
    service = TwistProcess(tmp_path / "twist.log", env={"COUCHDB_URL": couch_server.url})
    service.start()
    try:
        path = f"/{big_attachment}/movie/movie.bin?token={TOKEN}"
        warm = start_download(service.port, path)  # warm up imports, pools and buffers
        warm.close()
        time.sleep(0.5)
        before = rss_bytes(service.process.pid)
        sock = start_download(service.port, path)
        read = _read_slowly(sock, rate=100_000, seconds=6)
        after = rss_bytes(service.process.pid)
        sock.close()
    finally:
        service.stop()
    growth = after - before
    with capsys.disabled():
        print(
            f"\n[memory] slow client read {read / 1e3:.0f} kB of a 64 MiB attachment in 6 s; "
            f"service RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB (growth {growth / 2**20:.2f} MiB)"
        )
    assert read > 300_000
    assert growth < 16 * 2**20


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_away_releases_the_upstream_connection(service, big_attachment):
    port = int(service.base_url.rsplit(":", 1)[1])
    path = f"/{big_attachment}/movie/movie.bin?token={TOKEN}"
    sock = await threads.deferToThread(start_download, port, path)
    await threads.deferToThread(sock.recv, 65536)
    carrying = service.proxy.connections_for("movie.bin")
    assert len(carrying) == 1
    assert carrying[0].open
    sock.close()
    assert await carrying[0].closes_within(2), "the upstream connection is still open after the client left"


@pytest_twisted.ensureDeferred
async def test_a_ranged_read_reads_no_further_upstream_than_needed(service, admin, big_attachment):
    """Range is asked of CouchDB; a server that ignores it (PouchDB) is sliced and cut off early."""
    url = service.url(big_attachment, "movie", "movie.bin", TOKEN)
    reply = await fetch(url, headers={"Range": "bytes=0-99"})
    assert (reply.status, len(reply.body)) == (206, 100)
    sent = [r for r in service.proxy.requests if "movie.bin" in r.target]
    assert [r.headers.get("range") for r in sent] == ["bytes=0-99"]
    status, _, _ = admin.request(
        "GET", admin.doc_path(big_attachment, "movie") + "/movie.bin", headers={"Range": "bytes=0-0"}
    )
    if status == 206:
        return  # the server honoured the Range itself: nothing more was sent
    (connection,) = service.proxy.connections_for("movie.bin")
    assert await connection.closes_within(2), "the rest of the attachment is still being read"


@pytest_twisted.ensureDeferred
async def test_a_compressed_chunked_body_cut_midway_is_not_a_clean_end(service, admin, db):
    """Without a Content-Length only an abort can tell the client the body is incomplete."""
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "log.txt", os.urandom(400_000).hex().encode(), "text/plain")
    service.proxy.fault = Fault("cut", matches=lambda target: "log.txt" in target, after=200_000)
    with pytest.raises(ResponseFailed):
        await fetch(service.url(db, "doc", "log.txt", TOKEN), headers={"Accept-Encoding": "gzip"})
