"""Where real CouchDB and PouchDB Server differ, couchtoken answers the same.

- CouchDB stores compressible types (``text/*``, JSON...) gzip-compressed and
  ignores ``Range`` for them (``Accept-Ranges: none``): couchtoken still
  answers a ``Range`` with a correct 206, and passes gzip through byte-exact.
- Gigabyte attachments (real CouchDB only: PouchDB Server fails above ~100 MiB):
  byte-exact with flat memory, and a Range from the middle costs only the range.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request

import pytest
import pytest_twisted

from tests.http import fetch
from tests.twistproc import TwistProcess, rss_bytes

TOKEN = "differences-token"
GIB = 1024**3


@pytest.fixture
def text_doc(admin, db):
    text = b"".join(b"line %06d of a compressible log file\n" % i for i in range(20_000))
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "log.txt", text, "text/plain")
    return text


@pytest_twisted.ensureDeferred
async def test_a_range_of_a_compressible_attachment_is_a_correct_206(service, db, text_doc):
    reply = await fetch(service.url(db, "doc", "log.txt", TOKEN), headers={"Range": "bytes=100000-100099"})
    assert reply.status == 206
    assert reply.body == text_doc[100_000:100_100]
    assert reply.header("content-range") == f"bytes 100000-100099/{len(text_doc)}"
    assert reply.header("content-encoding") is None
    assert reply.header("accept-ranges") == "bytes"
    suffix = await fetch(service.url(db, "doc", "log.txt", TOKEN), headers={"Range": "bytes=-10"})
    assert (suffix.status, suffix.body) == (206, text_doc[-10:])


@pytest_twisted.ensureDeferred
async def test_gzip_passes_through_exactly_as_the_server_sent_it(service, admin, db, text_doc):
    direct_status, direct_headers, direct_body = admin.request(
        "GET", admin.doc_path(db, "doc") + "/log.txt", headers={"Accept-Encoding": "gzip"}
    )
    assert direct_status == 200
    reply = await fetch(service.url(db, "doc", "log.txt", TOKEN), headers={"Accept-Encoding": "gzip"})
    assert reply.status == 200
    assert reply.body == direct_body, "the bytes are the server's own"
    assert reply.header("content-encoding") == direct_headers.get("content-encoding")
    if reply.header("content-encoding") == "gzip":
        assert gzip.decompress(reply.body) == text_doc
    else:
        assert reply.body == text_doc
    if direct_headers.get("content-length"):  # CouchDB: stored gzip, its length known from the stub
        assert reply.header("content-length") == direct_headers["content-length"]
        url = service.url(db, "doc", "log.txt", TOKEN)
        head = await fetch(url, "HEAD", headers={"Accept-Encoding": "gzip"})
        assert head.header("content-length") == reply.header("content-length")
    plain = await fetch(service.url(db, "doc", "log.txt", TOKEN))
    assert (plain.header("content-encoding"), plain.body) == (None, text_doc)


@pytest.fixture(scope="module")
def gigabyte(couch_server, admin, tmp_path_factory):
    """A 1 GiB attachment on real CouchDB, and its SHA-256 (written once per run)."""
    if couch_server.kind == "pouchdb":
        pytest.skip("PouchDB Server cannot store attachments above ~100 MiB")
    path = tmp_path_factory.mktemp("gib") / "big.bin"
    digest = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as out:
        for i in range(GIB // len(block)):
            chunk = block[i % 7 :] + block[: i % 7]  # not one block repeated: offsets show
            digest.update(chunk)
            out.write(chunk)
    name = f"ct-gib-{os.getpid()}"
    admin.create_db(name)
    admin.put(name, "doc", {"download_token": TOKEN})
    with open(path, "rb") as data:
        admin.put_attachment(name, "doc", "big.bin", data, "application/octet-stream")
    yield name, digest.hexdigest(), path
    admin.delete_db(name)
    path.unlink()


@pytest.mark.slow
def test_a_gigabyte_downloads_byte_exact_with_flat_memory(gigabyte, couch_server, tmp_path, capsys):
    name, expected, _ = gigabyte
    service = TwistProcess(tmp_path / "twist.log", env={"COUCHDB_URL": couch_server.url})
    service.start()
    try:
        url = f"{service.base_url}/{name}/doc/big.bin?token={TOKEN}"
        with urllib.request.urlopen(url, timeout=60) as warm:
            warm.read(1024 * 1024)  # warm up imports, pools and buffers
        before = rss_bytes(service.process.pid)
        peak = before
        digest = hashlib.sha256()
        size = 0
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.headers["Content-Length"] == str(GIB)
            while chunk := response.read(4 * 1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
                if size % (64 * 1024 * 1024) < len(chunk):
                    peak = max(peak, rss_bytes(service.process.pid))
        peak = max(peak, rss_bytes(service.process.pid))
    finally:
        service.stop()
    with capsys.disabled():
        print(
            f"\n[memory] 1 GiB from CouchDB: RSS {before / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB "
            f"(growth {(peak - before) / 2**20:.2f} MiB)"
        )
    assert size == GIB
    assert digest.hexdigest() == expected
    assert peak - before < 32 * 2**20


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_range_from_the_middle_of_a_gigabyte_costs_only_the_range(service, gigabyte):
    name, _, path = gigabyte
    start = GIB // 2 + 12345
    reply = await fetch(
        service.url(name, "doc", "big.bin", TOKEN), headers={"Range": f"bytes={start}-{start + 65535}"}
    )
    assert reply.status == 206
    with open(path, "rb") as original:
        original.seek(start)
        assert reply.body == original.read(65536)
    (connection,) = service.proxy.connections_for("big.bin")
    assert connection.received < 65536 + 4096, "CouchDB sent more than the range (plus headers)"
