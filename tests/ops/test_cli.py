"""``twist couchtoken``: options, environment, and a real subprocess serving downloads."""

from __future__ import annotations

import os
import socket
import ssl
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


def test_throttle_options():
    defaults = _parse([], {})
    assert (defaults.max_failures, defaults.max_client_failures, defaults.trusted_proxies) == (30, 300, ())
    settings = _parse(
        ["--max-failures", "5", "--max-client-failures", "0", "--trusted-proxies", "unix,10.0.0.0/8"], {}
    )
    assert (settings.max_failures, settings.max_client_failures) == (5, 0)
    assert settings.trusted_proxies == ("unix", "10.0.0.0/8")


def test_environment_then_options_win():
    env = {"COUCHDB_URL": "http://a:b@envhost:1234", "DOWNLOAD_TOKEN_KEY_NAME": "data.token"}
    settings = _parse([], env)
    assert settings.couchdb.nodes[0].base_url == "http://envhost:1234"
    assert settings.token_field == ("data", "token")
    settings = _parse(["--couchdb-url", "http://clihost:5984", "--token-field", "secret"], env)
    assert settings.couchdb.nodes[0].base_url == "http://clihost:5984"
    assert settings.couchdb.nodes[0].authorization is None
    assert settings.token_field == ("secret",)


def test_disk_cache_options(tmp_path):
    settings = _parse([], {})
    assert (settings.disk_cache_dir, settings.disk_cache_bytes, settings.disk_cache_max_item) == (
        None,
        10 * 2**30,
        2**30,
    )
    argv = ["--disk-cache-dir", str(tmp_path), "--disk-cache-bytes", "5000000", "--disk-cache-max-item", "9"]
    settings = _parse(argv, {})
    assert (settings.disk_cache_dir, settings.disk_cache_bytes, settings.disk_cache_max_item) == (
        str(tmp_path),
        5_000_000,
        9,
    )
    assert f"disk_cache_dir={tmp_path} " in settings.describe()


def test_a_disk_cache_dir_that_holds_other_files_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(usage.UsageError, match="is not a couchtoken disk cache"):
        _parse(["--disk-cache-dir", str(tmp_path)], {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(usage.UsageError, match="is not a directory"):
        _parse(["--disk-cache-dir", str(tmp_path / "file")], {})
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    "argv",
    [
        ["--disk-cache-bytes", "-1"],
        ["--disk-cache-max-item", "lots"],
        ["--couchdb-url", "not a url"],
        ["--token-field", "a..b"],
        ["--connect-timeout", "0"],
        ["--response-timeout", "-1"],
        ["--couchdb-url", "ftp://h"],
        ["--public-metrics", "--workers", "2"],
    ],
)
def test_bad_options_are_usage_errors(argv):
    with pytest.raises(usage.UsageError):
        _parse(argv, {})


def _twist(*args: str) -> subprocess.CompletedProcess[str]:
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
        "--disk-cache-dir",
        "--disk-cache-bytes",
        "--disk-cache-max-item",
        "--workers",
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


def _alpn(port: int) -> str | None:
    """What the server picks when a client offers h2 and http/1.1."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        return sock.selected_alpn_protocol()


@pytest.mark.parametrize(("argv", "chosen"), [([], "h2"), (["--no-http2"], "http/1.1")])
def test_a_tls_port_offers_h2_unless_turned_off(couch_server, tmp_path, argv, chosen):
    service = TwistProcess(
        tmp_path / "twist.log", argv, env={"COUCHDB_URL": couch_server.url}, tls_dir=tmp_path
    )
    service.start()
    try:
        assert _alpn(service.port) == chosen
    finally:
        service.stop()
    assert ("http2=off" if argv else "http2=on") in service.log()


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
        (["--sandbox-types", "text/x-a;q=1"], "--sandbox-types: 'text/x-a;q=1' is not a media type"),
        (["--force-download-types", "text/html,html"], "--force-download-types: 'html' is not a media type"),
        (["--force-download-types", "*/*"], "--force-download-types: '*/*' is not a media type"),
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


def test_the_readme_way_to_run_it_logs_readable_lines_off_a_terminal(couch_server, tmp_path):
    """``twist`` writes JSON events when its output is no terminal, unless told --log-format=text."""
    readme = (ROOT / "README.rst").read_text()
    documented = next(line.split() for line in readme.splitlines() if line.strip().startswith("twist "))
    assert documented[:3] == ["twist", "--log-format=text", "couchtoken"], documented
    port = free_port()
    argv = [sys.executable, "-m", "twisted", *documented[1:-1], f"tcp:{port}:interface=127.0.0.1"]
    log = tmp_path / "out.log"
    with open(log, "wb") as out:  # a file, as under a supervisor
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "COUCHDB_URL": couch_server.url},
        )
        try:
            deadline = time.monotonic() + 30
            while "couchtoken starting" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            process.terminate()
            process.wait(30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert any("couchtoken starting" in line for line in lines)
    assert not any(line.lstrip().startswith("{") for line in lines), lines[:5]


def test_workers_auto_is_one_per_cpu_this_process_may_use():
    options = Options(environ={})
    options.parseOptions(["--workers", "auto"])
    assert options["workers"] == len(os.sched_getaffinity(0))
    options = Options(environ={})
    options.parseOptions([])
    assert options["workers"] == 1
