"""``twist couchtoken``: options, environment, and a real subprocess serving downloads."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from twisted.python import usage

from couchtoken.dev.pouchdb import ROOT, free_port
from couchtoken.ops.tap import Options
from tests.twistproc import TwistProcess

TOKEN = "cli-token"


def _parse(argv, environ):
    options = Options(environ=environ)
    options.parseOptions(argv)
    return options["settings"]


def test_defaults_without_environment():
    settings = _parse([], {})
    assert settings.couchdb.nodes[0].base_url == "http://localhost:5984"
    assert settings.couchdb.nodes[0].authorization is None
    assert settings.token_field == ("download_token",)


def test_cache_options():
    settings = _parse(
        ["--cache-size", "0", "--cache-ttl", "30", "--max-feeds", "3", "--feed-heartbeat", "2"], {}
    )
    assert (settings.cache_size, settings.cache_ttl, settings.max_feeds, settings.feed_heartbeat) == (
        0,
        30,
        3,
        2,
    )
    assert _parse([], {}).cache_bytes == 64 * 1024 * 1024
    assert _parse(["--cache-bytes", "1048576"], {}).cache_bytes == 1048576


def test_environment_then_options_win():
    env = {"COUCHDB_URL": "http://a:b@envhost:1234", "DOWNLOAD_TOKEN_KEY_NAME": "data.token"}
    settings = _parse([], env)
    assert settings.couchdb.nodes[0].base_url == "http://envhost:1234"
    assert settings.token_field == ("data", "token")
    settings = _parse(["--couchdb-url", "http://clihost:5984", "--token-field", "secret"], env)
    assert settings.couchdb.nodes[0].base_url == "http://clihost:5984"
    assert settings.couchdb.nodes[0].authorization is None
    assert settings.token_field == ("secret",)


@pytest.mark.parametrize(
    "argv",
    [
        ["--couchdb-url", "not a url"],
        ["--token-field", "a..b"],
        ["--connect-timeout", "0"],
        ["--response-timeout", "-1"],
        ["--couchdb-url", "ftp://h"],
    ],
)
def test_bad_options_are_usage_errors(argv):
    with pytest.raises(usage.UsageError):
        _parse(argv, {})


def _twist(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "twisted", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def test_help_documents_every_option():
    result = _twist("couchtoken", "--help")
    assert result.returncode == 0, result.stderr
    for flag in (
        "--port",
        "--couchdb-url",
        "--token-field",
        "--connect-timeout",
        "--response-timeout",
        "--max-connections",
        "COUCHDB_URL",
        "DOWNLOAD_TOKEN_KEY_NAME",
    ):
        assert flag in result.stdout


def test_twist_couchtoken_serves_downloads(couch_server, admin, db, tmp_path):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "hello.txt", b"hello from twist", "text/plain")
    password = couch_server.url.split("@")[0].rsplit(":", 1)[1]
    service = TwistProcess(tmp_path / "twist.log", env={"COUCHDB_URL": couch_server.url})
    service.start()
    try:
        with urllib.request.urlopen(f"{service.base_url}/{db}/doc/hello.txt?token={TOKEN}") as response:
            assert response.status == 200
            assert response.read() == b"hello from twist"
            assert response.headers["Content-Type"] == "text/plain"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{service.base_url}/{db}/doc/hello.txt?token=nope")
        assert refused.value.code == 403
    finally:
        service.stop()
    log = service.log()
    assert "couchtoken starting" in log
    assert "<credentials>" in log
    assert "token=REDACTED" in log
    assert TOKEN not in log
    assert password not in log


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--port", "nonsense"], "--port 'nonsense' is not a usable endpoint"),
        (["--metrics-port", "bogus"], "--metrics-port 'bogus' is not a usable endpoint"),
        (["--port", "tcp:notaport"], "--port 'tcp:notaport' is not a usable endpoint"),
        (["--port", "systemd:domain=INET:index=0"], "no such socket was passed in by systemd"),
        (["--trusted-proxies", "notanip"], "'notanip' is not an IP address or network"),
        (["--trusted-proxies", "10.0.0.0/8,"], "no empty items"),
        (["--max-connections", "-5"], "must be 1 or more"),
        (["--max-connections", "0"], "must be 1 or more"),
        (["--cache-bytes", "-1"], "must not be negative"),
        (["--max-downloads", "0"], "must be 1 or more"),
        (["--databases", ","], "--databases takes a comma-separated list with no empty items"),
        (["--sandbox-types", "text/x-a,,"], "--sandbox-types takes a comma-separated list"),
        (["--connect-timeout", "0"], "must be a positive number"),
    ],
)
def test_bad_options_are_one_line_errors_with_status_64(argv, says):
    result = _twist("couchtoken", *argv)
    output = result.stdout + result.stderr
    assert result.returncode == 64, output[-2000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and says in errors[0], errors


def test_an_unreachable_couchdb_is_one_warning_at_start_and_the_service_runs(tmp_path):
    service = TwistProcess(tmp_path / "twist.log", env={"COUCHDB_URL": f"http://127.0.0.1:{free_port()}"})
    service.start()
    try:
        deadline = time.monotonic() + 10
        while "does not answer" not in service.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"{service.base_url}/db/doc/f.txt?token=t", timeout=10)
        assert failed.value.code in (502, 504)
        time.sleep(2.5)  # the background retries must not repeat the warning
    finally:
        service.stop()
    warnings = [line for line in service.log().splitlines() if "does not answer" in line]
    assert len(warnings) == 1, warnings
    assert "Retrying" in warnings[0]
    assert service.process.returncode == 0


def test_stopping_logs_no_warning(couch_server, admin, db, tmp_path):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "hello.txt", b"hello", "text/plain")
    service = TwistProcess(tmp_path / "twist.log", env={"COUCHDB_URL": couch_server.url})
    service.start()
    try:
        with urllib.request.urlopen(f"{service.base_url}/{db}/doc/hello.txt?token={TOKEN}") as response:
            assert response.read() == b"hello"  # starts the database's feed, which is still connecting
    finally:
        service.stop()
    log = service.log()
    assert "couchtoken starting" in log
    assert "CancelledError" not in log
    assert "#warn]" not in log and "#error]" not in log and "#critical]" not in log, log[-3000:]
