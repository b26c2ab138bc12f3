"""HTTP/2 on a TLS port: the whole route over h2, HTTP/1.1 beside it, and the guards per stream.

The service listens on an ``ssl:`` endpoint with a certificate the test
makes (``tests/tlscert.py``).  ``curl --http2`` and ``h2load`` (Debian's
``curl`` and ``nghttp2-client``) are skipped with the reason where missing,
and fail under CI, where ``.ci/run`` installs them.  ``tests/h2client.py``
is a client that holds back flow control per stream.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from typing import Any

import attrs
import h2.errors
import h2.settings
import pytest
import pytest_twisted
from hyperframe.frame import HeadersFrame
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater

from couchtoken.web.h2 import GuardedH2Connection
from tests.faultproxy import Fault
from tests.h2client import H2Client
from tests.http import fetch
from tests.logs import access_lines
from tests.seeding import random_attachment_db
from tests.tlscert import ssl_port
from tests.tools import require_curl_with_http2, require_tool
from tests.twistproc import TwistProcess, rss_bytes
from tests.upstream.test_disk_cache import FakeFailingReads
from tests.waiting import wait_until

TOKEN = "h2-token"
SMALL = b"tiny bytes over h2\n" * 50
LARGE_SIZE = 24 * 1024 * 1024


@attrs.define
class TLSService:
    """A running service (``tests.conftest.RunningService``) listening on TLS as well."""

    plain: Any
    port: int

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def url(self, db: str, docid: str, attachment: str, token: str | None = None, **query: str) -> str:
        return self.plain.url(db, docid, attachment, token, **query).replace(
            self.plain.base_url, self.base_url, 1
        )

    @property
    def site(self) -> Any:
        return self.plain.app.site


@pytest.fixture
def start_tls_service(start_service, tmp_path):
    """``await start_tls_service(**settings)``: the service on an ``ssl:`` port (and its plain one)."""
    ports = []

    async def start(**options: Any) -> TLSService:
        plain = await start_service(**options)
        directory = tmp_path / f"tls{len(ports)}"
        directory.mkdir()
        port = await serverFromString(reactor, ssl_port(directory)).listen(plain.app.site)
        ports.append(port)
        return TLSService(plain, port.getHost().port)

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


@pytest_twisted.async_fixture
async def tls_service(start_tls_service):
    return await start_tls_service()


@pytest.fixture
def files(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "small.txt", SMALL, "text/plain")
    return db


def _run_curl(curl: str, args: tuple[str, ...]) -> tuple[str, int, bytes, str]:
    result = subprocess.run(
        [curl, "-sk", "-D", "/dev/stderr", "-o", "/dev/stdout", "-w", "\n@@%{http_version} %{http_code}"]
        + list(args),
        capture_output=True,
        timeout=60,
    )
    body, _, tail = result.stdout.rpartition(b"\n@@")
    version, _, status = tail.decode().partition(" ")
    assert status.isdigit(), (result.returncode, result.stdout[-300:], result.stderr[-500:])
    return version, int(status), body, result.stderr.decode("latin-1")


async def _curl(*args: str) -> tuple[str, int, bytes, str]:
    """``curl -sk ARGS``: (HTTP version, status, body, response headers)."""
    return await threads.deferToThread(_run_curl, require_curl_with_http2(), args)


@pytest_twisted.ensureDeferred
async def test_curl_over_http2_gets_the_route_and_http1_still_works(tls_service, files, logged):
    url = tls_service.url(files, "doc", "small.txt", TOKEN)
    version, status, body, headers = await _curl("--http2", url)
    assert (version, status, body) == ("2", 200, SMALL), headers
    assert f"content-length: {len(SMALL)}" in headers.lower()
    version, status, body, headers = await _curl("--http2", "-H", "Range: bytes=5-9", url)
    assert (version, status, body) == ("2", 206, SMALL[5:10])
    assert f"content-range: bytes 5-9/{len(SMALL)}" in headers.lower()
    version, status, body, _ = await _curl("--http2", tls_service.url(files, "doc", "small.txt", "wrong"))
    assert (version, status) == ("2", 403)
    assert b"invalid or missing download token" in body
    version, status, head, _ = await _curl("--http2", "-I", url)  # -I writes the head as the body
    assert (version, status) == ("2", 200)
    assert head.endswith(b"content-length: %d\r\n\r\n" % len(SMALL)), head  # and no body after it
    etag = re.search(rb"etag: (\S+)", head).group(1).decode()
    version, status, body, _ = await _curl("--http2", "-H", f"If-None-Match: {etag}", url)
    assert (version, status, body) == ("2", 304, b"")
    version, status, _, headers = await _curl("--http2", "-X", "OPTIONS", url)
    assert (version, status) == ("2", 204)
    assert "access-control-allow-methods: get, head, options" in headers.lower()
    version, status, body, _ = await _curl("--http1.1", url)
    assert (version, status, body) == ("1.1", 200, SMALL)
    lines = [e["line"] for e in access_lines(logged)]
    assert any(' HTTP/2" 200 ' in line for line in lines), lines
    assert any(' HTTP/1.1" 200 ' in line for line in lines), lines
    assert not any(TOKEN in line for line in lines)


@pytest.fixture(scope="module")
def large(admin):
    """A database with a 24 MiB attachment (stored once per module: PouchDB takes a while)."""
    yield from random_attachment_db(
        admin, "ct-h2", TOKEN, "large.bin", LARGE_SIZE, others={"small.txt": (SMALL, "text/plain")}
    )


def _path(db: str, attachment: str, token: str = TOKEN) -> str:
    return f"/{db}/doc/{attachment}?token={token}"


def _held(service: TLSService) -> int:
    """Body bytes taken from CouchDB for a running download: what the service (and the kernel) holds
    for a client that reads nothing."""
    return max((request.sentLength for request in service.plain.app.app.in_flight.active), default=0)


def _in_thread(function: Any, *args: Any) -> Any:
    return threads.deferToThread(function, *args)


@pytest_twisted.ensureDeferred
async def test_curl_gets_only_http1_with_no_http2(start_tls_service, files):
    service = await start_tls_service(http2=False)
    version, status, body, _ = await _curl("--http2", service.url(files, "doc", "small.txt", TOKEN))
    assert (version, status, body) == ("1.1", 200, SMALL)


@pytest_twisted.ensureDeferred
async def test_the_connection_announces_its_limits(tls_service, files):
    def settings() -> dict[int, int]:
        client = H2Client(tls_service.port)
        try:
            assert client.until(lambda: client.remote_settings, 5)
            return client.remote_settings
        finally:
            client.close()

    announced = await _in_thread(settings)
    assert announced[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 100
    assert announced[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 65536


@pytest_twisted.ensureDeferred
async def test_a_stalled_stream_holds_back_only_itself_and_is_reset_when_idle(start_tls_service, large):
    """Per-stream flow control reaches CouchDB; the other streams on the connection keep flowing."""
    db, _ = large
    service = await start_tls_service(idle_timeout=3.0)
    client = await _in_thread(H2Client, service.port)
    try:
        slow = client.get(_path(db, "large.bin"))
        client.stalled.add(slow)  # its 64 KiB window is never given back
        assert await _in_thread(client.until, lambda: len(client.streams[slow].body) >= 65535, 10)
        small = [client.get(_path(db, "small.txt")) for _ in range(30)]
        assert await _in_thread(client.until, lambda: all(client.done(s) for s in small), 10)
        assert all((client.streams[s].status, bytes(client.streams[s].body)) == (200, SMALL) for s in small)
        assert not client.done(slow)
        assert _held(service) < 1024 * 1024, "the stalled stream was read on from CouchDB"
        # Reading nothing for --idle-timeout resets that stream only.
        assert await _in_thread(client.until, lambda: client.streams[slow].reset is not None, 10)
        again = client.get(_path(db, "small.txt"))
        assert await _in_thread(client.until, lambda: client.done(again), 10)
        assert (client.streams[again].status, bytes(client.streams[again].body)) == (200, SMALL)
    finally:
        client.close()
    assert await wait_until(lambda: not service.plain.app.app.in_flight.active, 5)
    assert await service.plain.proxy.connections_for("large.bin")[0].closes_within(5)


@pytest_twisted.ensureDeferred
async def test_a_client_that_reads_nothing_gets_nothing_buffered_whatever_its_window(
    start_tls_service, large
):
    """A 2 GiB window would let every stream queue its whole body; a blocked network pauses them all."""
    db, digest = large
    service = await start_tls_service()
    client = await _in_thread(lambda: H2Client(service.port, window=2**31 - 1))
    try:
        stream = client.get(_path(db, "large.bin"))
        assert await wait_until(lambda: _held(service) > 0, 10)
        await deferLater(reactor, 2.0)  # the client does not read its socket
        assert service.plain.app.app.in_flight.active, "CouchDB's whole body was taken into memory"
        held = _held(service)
        assert held < 6 * 1024 * 1024, f"{held} bytes taken from CouchDB for a client that reads nothing"
        assert await _in_thread(client.until, lambda: client.done(stream), 60)
        state = client.streams[stream]
        assert state.status == 200
        assert hashlib.sha256(state.body).hexdigest() == digest
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_max_downloads_counts_streams(start_tls_service, large):
    db, _ = large
    service = await start_tls_service(max_downloads=1)
    client = await _in_thread(H2Client, service.port)
    try:
        slow = client.get(_path(db, "large.bin"))
        client.stalled.add(slow)
        assert await _in_thread(client.until, lambda: client.streams[slow].status == 200, 10)
        second = client.get(_path(db, "small.txt"))
        assert await _in_thread(client.until, lambda: client.done(second), 10)
        state = client.streams[second]
        assert state.status == 503
        assert state.headers[b"retry-after"] == b"1"
    finally:
        client.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path,headers,status",
    [
        ("/db/doc/" + "a" * 9000 + "?token=x", [], 414),
        ("/db/doc/f", [("x-big", "b" * 17000)], 431),
        ("/db/doc/f", [(f"x-h{i}", "d" * 100) for i in range(200)], 431),
    ],
    ids=["long-uri", "huge-header", "many-headers"],
)
async def test_oversized_requests_get_414_or_431_on_their_stream(tls_service, files, path, headers, status):
    def exchange() -> tuple[int | None, bytes, int | None]:
        client = H2Client(tls_service.port)
        try:
            big = client.get(path, headers)
            assert client.until(lambda: client.done(big), 10)
            fine = client.get(_path(files, "small.txt"))
            assert client.until(lambda: client.done(fine), 10)
            return client.streams[big].status, bytes(client.streams[big].body), client.streams[fine].status
        finally:
            client.close()

    got, body, then = await _in_thread(exchange)
    assert (got, then) == (status, 200)
    assert b"Traceback" not in body and b"error" in body
    assert not [target for target in tls_service.plain.couchdb_targets() if target.startswith("GET /db/")]


WINDOW = 65535  # the initial flow-control window of a stream, which the service announces unchanged


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "method,headers,size",
    [
        ("GET", [("content-length", "200000000")], 1024 * 1024),
        ("GET", [("content-length", "1")], 1),
        ("GET", [("content-length", "70000"), ("expect", "100-continue")], 70000),
        ("HEAD", [("content-length", "5000")], None),
        ("GET", [], 1024 * 1024),
        ("HEAD", [], 10),
        ("POST", [("content-length", "200000000")], 1024 * 1024),
    ],
    ids=[
        "get-huge",
        "get-1",
        "get-expecting-continue",
        "head-announced-only",
        "get-data-without-length",
        "head-data",
        "post",
    ],
)
async def test_a_request_body_is_refused_on_its_stream_before_it_is_read(
    tls_service, files, logged, method, headers, size
):
    """As over HTTP/1.1: 413 at once (the length announced, or the first DATA); the stream's window is
    never given back, so a client sends at most its first window of body; the connection goes on."""

    def exchange() -> tuple[int, Any, Any, bool]:
        client = H2Client(tls_service.port)
        try:
            refused = client.get(
                f"/{files}/refused/small.txt?token={TOKEN}", headers, method=method, end_stream=size is None
            )
            sent = client.send_body(refused, size) if size is not None else 0
            client.until(lambda: client.done(refused), 5)
            fine = client.get(_path(files, "small.txt")) if not client.closed else None
            client.until(lambda: fine is not None and client.done(fine), 10)
            return sent, client.streams[refused], client.streams.get(fine), client.closed
        finally:
            client.close()

    sent, refused, fine, closed = await _in_thread(exchange)
    assert (refused.status, sent <= WINDOW, closed) == (413, True, False), (refused, sent, closed)
    assert refused.informational == []  # no "100 Continue" for a refused body
    if method != "HEAD":
        assert json.loads(refused.body)["error"] == "content_too_large"
    if size and size > WINDOW:  # still sending: told to stop
        assert refused.reset == h2.errors.ErrorCodes.NO_ERROR
    assert (fine.status, bytes(fine.body), closed) == (200, SMALL, False)
    assert not [target for target in tls_service.plain.couchdb_targets() if "/refused" in target]
    assert not any(e.get("log_failure") for e in logged)


@pytest_twisted.ensureDeferred
async def test_an_empty_body_is_no_body_over_http2(tls_service, files):
    """A length of 0, or an empty DATA frame that ends the request, is served."""

    def exchange() -> list[tuple[int | None, bytes]]:
        client = H2Client(tls_service.port)
        try:
            announced = client.get(_path(files, "small.txt"), [("content-length", "0")])
            ended_apart = client.get(_path(files, "small.txt"), end_stream=False)
            client.send_body(ended_apart, 0)
            assert client.until(lambda: client.done(announced) and client.done(ended_apart), 10)
            return [
                (client.streams[s].status, bytes(client.streams[s].body)) for s in (announced, ended_apart)
            ]
        finally:
            client.close()

    assert await _in_thread(exchange) == [(200, SMALL), (200, SMALL)]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "excess",
    ["header-list", "streams"],
)
async def test_past_the_announced_limits_the_connection_goes_away(tls_service, files, excess):
    """Headers over 64 KiB, or a 101st concurrent stream."""

    def exceed() -> tuple[bool, int | None]:
        client = H2Client(tls_service.port)
        try:
            if excess == "header-list":
                client.get(_path(files, "small.txt"), [(f"x-h{i}", "d" * 1000) for i in range(70)])
            else:
                # Requests left unfinished (no END_STREAM) stay open however fast the service
                # is, so the 101st really is one too many.
                for _ in range(101):
                    client.get(_path(files, "small.txt"), end_stream=False)
            while client.pump(0.3) and client.goaway is None:
                pass
            client.until(lambda: client.closed, 5)
            return client.closed, client.goaway and client.goaway.error_code
        finally:
            client.close()

    closed, code = await _in_thread(exceed)
    assert closed and code in (h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    version, status, _, _ = await _curl("--http2", tls_service.url(files, "doc", "small.txt", TOKEN))
    assert (version, status) == ("2", 200)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("unfinished", ["header-block", "request"])
async def test_slow_requests_lose_the_connection_and_others_are_served(
    tls_service, files, monkeypatch, unfinished
):
    """A header block without END_HEADERS, or a request without END_STREAM, has header_timeout."""
    monkeypatch.setattr(GuardedH2Connection, "header_timeout", 1.0)

    def trickle() -> tuple[bool, int | None, float]:
        client = H2Client(tls_service.port)
        try:
            assert client.until(lambda: client.remote_settings, 5)  # and acknowledged: nothing else to send
            started = time.monotonic()
            if unfinished == "header-block":
                client.send_raw(HeadersFrame(1, data=b"\x82\x87", flags=["END_STREAM"]))  # no END_HEADERS
            else:
                client.get("/a/b/c", end_stream=False)
            while client.pump(0.3) and time.monotonic() - started < 10:
                pass
            return client.closed, client.goaway and client.goaway.error_code, time.monotonic() - started
        finally:
            client.close()

    trickling = _in_thread(trickle)
    for _ in range(5):
        version, status, body, _ = await _curl("--http2", tls_service.url(files, "doc", "small.txt", TOKEN))
        assert (version, status, body) == ("2", 200, SMALL)
    closed, code, seconds = await trickling
    assert closed and code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, (closed, code)
    assert 0.9 < seconds < 5


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_goes_away_however_often_it_pings(tls_service, files):
    tls_service.site.timeOut = 1.0

    def ping_along() -> tuple[bool, int | None, float]:
        client = H2Client(tls_service.port)
        try:
            served = client.get(_path(files, "small.txt"))
            assert client.until(lambda: client.done(served), 10)
            started = time.monotonic()
            while client.pump(0.3) and time.monotonic() - started < 10:
                client.ping()
            return client.closed, client.goaway and client.goaway.error_code, time.monotonic() - started
        finally:
            client.close()

    closed, code, seconds = await _in_thread(ping_along)
    assert closed and code == h2.errors.ErrorCodes.NO_ERROR, (closed, code)
    assert seconds < 5


@pytest_twisted.ensureDeferred
async def test_an_upstream_dying_mid_body_resets_only_that_stream(tls_service, large):
    db, _ = large
    tls_service.plain.proxy.fault = Fault("cut", matches=lambda target: "large.bin" in target, after=300_000)
    await _large_is_reset_and_others_served(tls_service, db)


async def _large_is_reset_and_others_served(service: TLSService, db: str) -> None:
    """large.bin's stream is reset (not ended as if complete); the next stream is served; nothing stays."""
    client = await _in_thread(H2Client, service.port)
    try:
        broken = client.get(_path(db, "large.bin"))
        assert await _in_thread(client.until, lambda: client.done(broken), 10), "the client waits for ever"
        assert client.streams[broken].reset is not None
        assert len(client.streams[broken].body) < LARGE_SIZE
        fine = client.get(_path(db, "small.txt"))
        assert await _in_thread(client.until, lambda: client.done(fine), 10)
        assert (client.streams[fine].status, bytes(client.streams[fine].body)) == (200, SMALL)
    finally:
        client.close()
    assert await wait_until(lambda: not service.plain.app.app.in_flight.active, 5)


async def _cached_on_disk(service: TLSService, db: str) -> None:
    """Download large.bin once over HTTP/1.1 and wait until its disk cache file is in place."""
    url = service.plain.url(db, "doc", "large.bin", TOKEN)
    await fetch(url, "HEAD")  # the token check, so that the next download fills
    assert len((await fetch(url)).body) == LARGE_SIZE
    disk = service.plain.app.disk
    assert await wait_until(lambda: disk.fills == 1, 10), "the file was never filled"


@pytest_twisted.ensureDeferred
async def test_a_stalled_stream_of_a_file_on_disk_is_reset_when_idle(start_tls_service, large, tmp_path):
    db, _ = large
    service = await start_tls_service(idle_timeout=2.0, disk_cache_dir=str(tmp_path / "cache"))
    await _cached_on_disk(service, db)
    client = await _in_thread(H2Client, service.port)
    try:
        slow = client.get(_path(db, "large.bin"))
        client.stalled.add(slow)
        assert await _in_thread(client.until, lambda: len(client.streams[slow].body) >= 65535, 10)
        assert service.plain.app.disk.hits == 1
        assert await _in_thread(client.until, lambda: client.streams[slow].reset is not None, 10), (
            "a stream that reads nothing of a file on disk is never cut"
        )
        again = client.get(_path(db, "small.txt"))
        assert await _in_thread(client.until, lambda: client.done(again), 10)
        assert client.streams[again].status == 200
    finally:
        client.close()
    assert await wait_until(lambda: not service.plain.app.app.in_flight.active, 5)


@pytest_twisted.ensureDeferred
async def test_a_file_on_disk_that_couchdb_cannot_finish_resets_its_stream(
    start_tls_service, large, tmp_path, monkeypatch
):
    db, _ = large
    service = await start_tls_service(disk_cache_dir=str(tmp_path / "cache"))
    await _cached_on_disk(service, db)
    FakeFailingReads(monkeypatch, tmp_path / "cache", "error")
    service.plain.proxy.fault = Fault("reset", matches=lambda target: "large.bin" in target)
    await _large_is_reset_and_others_served(service, db)


@pytest_twisted.ensureDeferred
async def test_h2load_4_connections_of_50_streams(tls_service, files):
    h2load = require_tool("h2load", "nghttp2-client")
    url = tls_service.url(files, "doc", "small.txt", TOKEN)
    result = await _in_thread(
        lambda: subprocess.run(
            [h2load, "-n", "2000", "-c", "4", "-m", "50", url], capture_output=True, text=True, timeout=120
        )
    )
    print(
        "\n[h2load]", *[line for line in result.stdout.splitlines() if "req/s" in line or "requests:" in line]
    )
    assert "Application protocol: h2" in result.stdout, result.stdout[-2000:]
    assert re.search(r"requests: 2000 total, 2000 started, 2000 done, 2000 succeeded", result.stdout), (
        result.stdout[-2000:]
    )
    assert re.search(r"status codes: 2000 2xx", result.stdout), result.stdout[-2000:]


@pytest.mark.slow
def test_slow_http2_readers_keep_the_service_memory_flat(large, couch_server, tmp_path, capsys):
    """A real ``twist`` on TLS; one connection, 4 streams of 24 MiB, a 2 GiB window, read at 600 kB/s."""
    db, _ = large
    service = TwistProcess(tmp_path / "twist.log", env={"COUCHDB_URL": couch_server.url}, tls_dir=tmp_path)
    service.start()
    try:
        warm = H2Client(service.port)  # imports, pools and buffers
        first = warm.get(_path(db, "small.txt"))
        assert warm.until(lambda: warm.done(first), 10)
        warm.close()
        before = rss_bytes(service.process.pid)
        client = H2Client(service.port, window=2**31 - 1)
        streams = [client.get(_path(db, "large.bin")) for _ in range(4)]
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 6:
            read = sum(len(client.streams[s].body) for s in streams)
            if read < 600_000 * elapsed:
                assert client.pump(0.1)
            else:
                time.sleep(0.02)
        after = rss_bytes(service.process.pid)
        client.close()
    finally:
        service.stop()
    growth = after - before
    with capsys.disabled():
        print(
            f"\n[memory] one HTTP/2 connection read {read / 1e6:.1f} MB of 4 x 24 MiB in 6 s; service RSS "
            f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB (growth {growth / 2**20:.2f} MiB)"
        )
    assert all(client.streams[s].status == 200 for s in streams)
    assert read > 1_000_000
    assert growth < 16 * 2**20
