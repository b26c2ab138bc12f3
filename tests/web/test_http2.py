"""HTTP/2 on a TLS port: the whole route over h2, HTTP/1.1 beside it, and the guards per stream.

The service listens on an ``ssl:`` endpoint with a certificate the test
makes (``tests/tlscert.py``).  ``curl --http2`` and ``h2load`` (Debian's
``curl`` and ``nghttp2-client``) are skipped with the reason where missing,
and fail under CI, where ``.ci/run`` installs them.  ``tests/h2client.py``
is a client that holds back flow control per stream.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString

from tests.tlscert import ssl_port

TOKEN = "h2-token"
SMALL = b"tiny bytes over h2\n" * 50
LARGE_SIZE = 24 * 1024 * 1024


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs Debian's {package}")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


def _curl_path() -> str:
    curl = _tool("curl", "curl")
    if "HTTP2" not in subprocess.run([curl, "-V"], capture_output=True, text=True).stdout:
        if os.environ.get("CI"):
            pytest.fail("this curl has no HTTP/2 support")
        pytest.skip("this curl has no HTTP/2 support")
    return curl


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
    return await threads.deferToThread(_run_curl, _curl_path(), args)


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
    lines = [e["line"] for e in logged if e.get("log_namespace") == "couchtoken.access"]
    assert any(' HTTP/2" 200 ' in line for line in lines), lines
    assert any(' HTTP/1.1" 200 ' in line for line in lines), lines
    assert not any(TOKEN in line for line in lines)
