"""Health, metrics, overload control, idle clients and access-log formats."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.python import usage

from couchtoken.dev.pouchdb import free_port
from couchtoken.ops.tap import Options
from tests.conftest import HEALTH_CHECKS
from tests.faultproxy import Fault
from tests.http import fetch, raw_exchange, start_download
from tests.logs import access_lines
from tests.waiting import wait_until

TOKEN = "ops-token"
BIG = 16 * 1024 * 1024


@pytest.fixture
def doc(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "small.txt", b"small", "text/plain")
    admin.put_attachment(db, "doc", "big.bin", os.urandom(BIG), "application/octet-stream")
    return "doc"


# -- /_health ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_is_200_with_feeds_and_cache_when_couchdb_answers(start_service, db, doc):
    service = await start_service(feed_heartbeat=0.2)
    await fetch(service.url(db, doc, "small.txt", TOKEN))
    assert await wait_until(lambda: any(f.fresh() for f in service.app.feeds.feeds()), 5)
    await fetch(service.url(db, doc, "small.txt", TOKEN))
    reply = await fetch(f"{service.ops_url}/_health")
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    body = reply.json()
    assert body["couchdb"] == "ok"
    assert body["feeds"] == {"mode": "per-database", "connected": 1, "total": 1}
    assert body["cache"]["entries"] == 1
    public = await fetch(f"{service.base_url}/_health")
    assert (public.status, public.json()) == (200, {"status": "ok"}), "no details on the public port"


@pytest_twisted.ensureDeferred
async def test_health_is_503_when_couchdb_does_not_answer(start_service):
    service = await start_service(couchdb_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    reply = await fetch(f"{service.base_url}/_health")
    assert reply.status == 503
    assert reply.json() == {"status": "unavailable"}
    assert time.monotonic() - started < 2


@pytest_twisted.ensureDeferred
async def test_health_polled_often_asks_couchdb_at_most_once_a_second(service):
    started = time.monotonic()
    for _ in range(30):
        assert (await fetch(f"{service.base_url}/_health")).status == 200
    elapsed = time.monotonic() - started
    pings = [t for t in service.couchdb_targets(health_checks=True) if t in HEALTH_CHECKS]
    # At most one a second, plus the start-up check and PouchDB Server's one miss of /_up.
    assert 1 <= len(pings) <= int(elapsed) + 3


@pytest_twisted.ensureDeferred
async def test_health_recovers_with_couchdb(service):
    service.proxy.outage()
    assert (await fetch(f"{service.base_url}/_health")).status == 503
    service.proxy.restore()
    await deferLater(reactor, 1.05)  # let the one-second-old answer age out
    assert (await fetch(f"{service.base_url}/_health")).status == 200


# -- /_metrics --------------------------------------------------------------------

METRIC_NAMES = [
    "couchtoken_requests_total",
    "couchtoken_response_bytes_total",
    "couchtoken_request_duration_seconds_bucket",
    "couchtoken_cache_hits_total",
    "couchtoken_cache_misses_total",
    "couchtoken_cache_evictions_total",
    "couchtoken_cache_entries",
    "couchtoken_feeds_connected",
    "couchtoken_feed_reconnects_total",
    "couchtoken_revocations_applied_total",
    "couchtoken_upstream_errors_total",
    "couchtoken_downloads_in_flight",
    "couchtoken_downloads_rejected_total",
    "couchtoken_idle_disconnects_total",
]


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_happened(start_service, admin, db, doc):
    service = await start_service(feed_heartbeat=0.2)
    for token in (TOKEN, TOKEN, "wrong"):
        await fetch(service.url(db, doc, "small.txt", token))
    assert await wait_until(lambda: any(f.fresh() for f in service.app.feeds.feeds()), 5)
    await fetch(service.url(db, doc, "small.txt", TOKEN))  # stored
    await fetch(service.url(db, doc, "small.txt", TOKEN))  # a hit
    admin.put(db, doc, {"download_token": "rotated"})
    assert await wait_until(lambda: service.app.documents.revocations == 1, 2)
    reply = await fetch(f"{service.ops_url}/_metrics")
    assert reply.status == 200
    assert reply.header("content-type").startswith("text/plain")
    text = reply.body.decode()
    for name in METRIC_NAMES:
        if name != "couchtoken_upstream_errors_total":  # labelled: absent until an error happens
            assert re.search(rf"^{name}", text, re.M), name
    assert metric(text, "couchtoken_requests_total", '{status="200"}') == 4
    assert metric(text, "couchtoken_requests_total", '{status="403"}') == 1
    assert metric(text, "couchtoken_response_bytes_total") >= 4 * len(b"small")
    assert metric(text, "couchtoken_cache_hits_total") >= 1
    assert metric(text, "couchtoken_cache_misses_total") >= 1
    assert metric(text, "couchtoken_revocations_applied_total") == 1
    assert metric(text, "couchtoken_cache_evictions_total") >= 1
    assert metric(text, "couchtoken_feeds_connected") == 1
    assert metric(text, "couchtoken_downloads_in_flight") == 0
    service.proxy.fault = Fault("garbage")
    await fetch(service.url(db, "other", "small.txt", TOKEN))
    text = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
    assert metric(text, "couchtoken_upstream_errors_total", '{kind="protocol"}') == 1


@pytest_twisted.ensureDeferred
async def test_metrics_are_off_the_public_port_unless_asked_for(start_service):
    service = await start_service()  # the fixture serves the --metrics-port site on service.ops_url
    assert (await fetch(f"{service.ops_url}/_metrics")).status == 200
    assert (await fetch(f"{service.ops_url}/_health")).status == 200
    assert (await fetch(f"{service.ops_url}/db/doc/f.txt?token=x")).status == 404
    hidden = await fetch(f"{service.base_url}/_metrics")
    assert hidden.status == 400  # as any path that names no attachment
    assert b"couchtoken_" not in hidden.body
    assert (await fetch(f"{service.base_url}/_health")).status == 200
    opted_in = await start_service(public_metrics=True)
    shown = await fetch(f"{opted_in.base_url}/_metrics")
    assert shown.status == 200
    assert b"couchtoken_requests_total" in shown.body


# -- Overload and idle clients ----------------------------------------------------------


def _open_download(port: int, path: str) -> socket.socket:
    """Start a download and read nothing: the response stays in flight."""
    return start_download(port, path, rcvbuf=4096)


@pytest_twisted.ensureDeferred
async def test_past_max_downloads_a_download_gets_503_at_once(start_service, db, doc):
    service = await start_service(max_downloads=1)
    port = int(service.base_url.rsplit(":", 1)[1])
    stuck = await threads.deferToThread(_open_download, port, f"/{db}/{doc}/big.bin?token={TOKEN}")
    try:
        assert await wait_until(lambda: len(service.app.app.in_flight.active) == 1, 5)
        # Wait for its attachment request too, so that the count below is stable.
        assert await wait_until(lambda: service.proxy.connections_for("big.bin"), 5)
        started = time.monotonic()
        reply = await fetch(service.url(db, doc, "small.txt", TOKEN))
        assert reply.status == 503
        assert reply.header("retry-after") == "1"
        assert time.monotonic() - started < 0.5
        seen = len(service.couchdb_targets())
        assert (await fetch(service.url(db, doc, "small.txt", TOKEN))).status == 503
        assert len(service.couchdb_targets()) == seen  # refused before any upstream work
    finally:
        stuck.close()
    assert await wait_until(lambda: len(service.app.app.in_flight.active) == 0, 5)
    assert (await fetch(service.url(db, doc, "small.txt", TOKEN))).status == 200


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_and_its_upstream_released(start_service, db, doc):
    service = await start_service(idle_timeout=1.0)
    port = int(service.base_url.rsplit(":", 1)[1])
    stuck = await threads.deferToThread(_open_download, port, f"/{db}/{doc}/big.bin?token={TOKEN}")
    try:
        assert await wait_until(lambda: service.proxy.connections_for("big.bin"), 5)
        (upstream,) = service.proxy.connections_for("big.bin")
        started = time.monotonic()
        assert await upstream.closes_within(5), "the upstream connection is still open"
        assert 0.9 < time.monotonic() - started < 4
        assert await wait_until(lambda: len(service.app.app.in_flight.active) == 0, 2)
        text = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
        assert metric(text, "couchtoken_idle_disconnects_total") == 1
    finally:
        stuck.close()


@pytest_twisted.ensureDeferred
async def test_a_slow_but_reading_client_is_not_cut(start_service, db, doc):
    service = await start_service(idle_timeout=0.5)
    port = int(service.base_url.rsplit(":", 1)[1])

    def read_slowly() -> int:
        sock = _open_download(port, f"/{db}/{doc}/small.txt?token={TOKEN}")
        sock.settimeout(5)
        data = b""
        while b"small" not in data:
            chunk = sock.recv(1)
            if not chunk:
                break
            data += chunk
            time.sleep(0.01)
        sock.close()
        return len(data)

    assert await threads.deferToThread(read_slowly) > 0


# -- Access-log formats -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_combined_log_lines(service, db, doc, logged):
    await fetch(
        service.url(db, doc, "small.txt", TOKEN), headers={"Referer": "https://app/x?token=abc&page=2"}
    )
    await fetch(f"{service.base_url}/_health")
    (event,) = access_lines(logged)
    line = event["line"]
    assert re.match(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /[^ ]+\?token=REDACTED HTTP/1\.1" '
        r'200 5 "https://app/x\?token=REDACTED&page=REDACTED" "[^"]*" \d+\.\dms cache=miss$',
        line,
    ), line
    assert TOKEN not in line and "abc" not in line


@pytest_twisted.ensureDeferred
async def test_json_log_lines(start_service, db, doc, logged):
    service = await start_service(access_log_format="json")
    await fetch(service.url(db, doc, "small.txt", "wrong"))
    (event,) = access_lines(logged)
    fields = json.loads(event["line"])
    assert fields["status"] == 403
    assert fields["uri"].endswith("?token=REDACTED")
    assert fields["cache"] == "miss"
    assert fields["duration_ms"] >= 0
    assert "wrong" not in event["line"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("log_format", ["combined", "json"])
async def test_control_characters_from_the_request_are_escaped_in_log_lines(
    start_service, db, doc, logged, log_format
):
    service = await start_service(access_log_format=log_format)
    port = int(service.base_url.rsplit(":", 1)[1])
    raw = (
        # Twisted itself refuses control characters in the request line (400), not in header values.
        b"GET /" + db.encode() + b"/doc/a%1b\\x1b.txt?token=x HTTP/1.1\r\nHost: x\r\n"
        b'User-Agent: evil\x1b[2J\x08\x08\x7f\xc3\xa9 \\ "q"\r\n'
        b"Referer: https://a/\x1b]0;title\x07\r\nConnection: close\r\n\r\n"
    )
    answer = await threads.deferToThread(raw_exchange, port, raw)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    (event,) = access_lines(logged)
    line = event["line"]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", line), repr(line)
    if log_format == "json":
        fields = json.loads(line)
        shown = " ".join(str(fields[key]) for key in ("method", "uri", "referer", "user_agent"))
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", shown), repr(shown)  # not even once decoded
        assert fields["user_agent"] == 'evil\\x1b[2J\\x08\\x08\\x7f\\xc3\\xa9 \\\\ "q"'
        assert fields["referer"] == "https://a/\\x1b]0;title\\x07"
        assert "/doc/a%1b\\\\x1b.txt?token=REDACTED" in fields["uri"]
    else:
        shown = line
        assert '"evil\\x1b[2J\\x08\\x08\\x7f\\xc3\\xa9 \\\\ \\"q\\""' in shown, shown
        assert '"https://a/\\x1b]0;title\\x07"' in shown, shown
        assert "/doc/a%1b\\\\x1b.txt?token=REDACTED " in shown, shown


# -- The CouchDB URL from a file ------------------------------------------------------------


def _settings(argv, environ):
    options = Options(environ=environ)
    options.parseOptions(argv)
    return options["settings"]


def test_the_couchdb_url_can_come_from_a_file(tmp_path):
    secret = tmp_path / "couchdb-url"
    secret.write_text("http://admin:file-secret@couch.internal:5984\n")
    for argv, env in (([f"--couchdb-url-file={secret}"], {}), ([], {"COUCHDB_URL_FILE": str(secret)})):
        settings = _settings(argv, env)
        assert settings.couchdb.nodes[0].base_url == "http://couch.internal:5984"
        assert settings.couchdb.nodes[0].authorization is not None
    # The command line still wins over the environment.
    settings = _settings(["--couchdb-url", "http://other:5984"], {"COUCHDB_URL_FILE": str(secret)})
    assert settings.couchdb.nodes[0].base_url == "http://other:5984"


def test_url_file_errors_never_show_its_content(tmp_path):
    secret = tmp_path / "couchdb-url"
    secret.write_text("ftp://admin:file-secret@h\n")
    with pytest.raises(usage.UsageError) as bad:
        _settings([f"--couchdb-url-file={secret}"], {})
    assert "file-secret" not in str(bad.value)
    with pytest.raises(usage.UsageError) as missing:
        _settings([f"--couchdb-url-file={tmp_path / 'nope'}"], {})
    assert "cannot read" in str(missing.value)
    with pytest.raises(usage.UsageError):
        _settings(["--couchdb-url", "http://h", f"--couchdb-url-file={secret}"], {})
