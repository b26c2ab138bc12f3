"""The download route against a real CouchDB-compatible server: every row of the status table."""

from __future__ import annotations

import hashlib
import os

import pytest
import pytest_twisted

from couchtoken.dev.pouchdb import CouchAdmin

TOKEN = "s3cret-T0ken"
BODY = b"hello world 0123456789\n"
FORBIDDEN = {"error": "forbidden", "reason": "invalid or missing download token"}


@pytest.fixture
def doc(admin: CouchAdmin, db: str) -> str:
    """A document with a token and a text attachment."""
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file.txt", BODY, "text/plain")
    return "doc"


@pytest_twisted.ensureDeferred
async def test_matching_token_streams_the_attachment_with_its_headers(service, db, doc, admin):
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN))
    assert reply.status == 200
    assert reply.body == BODY
    assert reply.header("content-type") == "text/plain"
    assert reply.header("content-length") == str(len(BODY))
    stub = admin.get(db, doc)["_attachments"]["file.txt"]
    digest = stub["digest"].removeprefix("md5-")
    assert reply.header("etag") == f'"{digest}"'
    assert reply.header("accept-ranges") == "bytes"
    assert reply.header("access-control-allow-origin") == "*"
    exposed = {h.strip().lower() for h in reply.header("access-control-expose-headers").split(",")}
    assert {"content-length", "content-range", "etag", "accept-ranges"} <= exposed
    assert reply.header("x-content-type-options") == "nosniff"


@pytest_twisted.ensureDeferred
async def test_head_answers_the_headers_without_a_body(service, db, doc):
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN), method="HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.header("content-length") == str(len(BODY))
    assert reply.header("content-type") == "text/plain"
    assert reply.header("etag")
    # HEAD needs the document only, never the attachment body.
    assert all("file.txt" not in t for t in service.couchdb_targets())


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "query",
    [{"token": "wrong"}, {}, {"token": ""}, {"token": TOKEN.upper()}, {"token": TOKEN + "x"}],
    ids=["wrong", "missing", "empty", "case", "longer"],
)
async def test_wrong_missing_or_empty_token_is_403(service, db, doc, query):
    from tests.http import service_url

    reply = await service.get(service_url(service.base_url, db, doc, "file.txt", **query))
    assert reply.status == 403
    assert reply.json() == FORBIDDEN
    assert reply.header("content-type") == "application/json"
    assert reply.header("access-control-allow-origin") == "*"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"download_token": None},
        {"download_token": ""},
        {"download_token": 123},
        {"download_token": {"a": 1}},
        {"download_token": []},
        {"download_token": [123, None, "", [TOKEN]]},
        {"download_token": True},
    ],
    ids=["absent", "null", "empty", "number", "object", "empty-list", "list-without-strings", "bool"],
)
async def test_document_without_a_usable_token_is_403(service, admin, db, fields):
    admin.put(db, "plain", fields)
    admin.put_attachment(db, "plain", "file.txt", BODY)
    for offered in ("", "123", "None", "null", "True", TOKEN):
        reply = await service.get(service.url(db, "plain", "file.txt", offered))
        assert (reply.status, reply.json()) == (403, FORBIDDEN)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("cache_size", [10_000, 0], ids=["cached", "uncached"])
async def test_a_document_nested_too_deeply_to_read_is_403_and_one_warning(
    start_service, admin, db, logged, cache_size
):
    service = await start_service(cache_size=cache_size)
    depth = 3000  # deeper than Python's recursion limit (1000); CouchDB and PouchDB store it
    body = f'{{"download_token": "{TOKEN}", "deep": {"[" * depth}{"]" * depth}}}'.encode()
    status, _, _ = admin.request(
        "PUT", admin.doc_path(db, "deep"), body, headers={"Content-Type": "application/json"}
    )
    assert status == 201
    for _ in range(3):
        reply = await service.get(service.url(db, "deep", "file.txt", TOKEN))
        assert (reply.status, reply.json()) == (403, FORBIDDEN)
    warnings = [e for e in logged if e.get("log_level") is not None and e["log_level"].name != "info"]
    assert [e["log_format"] for e in warnings] == [
        "CouchDB document {db}/{docid} is nested too deeply to read; it opens nothing"
    ], warnings
    assert not any(e.get("log_failure") for e in logged)


@pytest_twisted.ensureDeferred
async def test_missing_document_or_database_is_the_same_403(service, db, doc):
    missing_doc = await service.get(service.url(db, "nope", "file.txt", TOKEN))
    missing_db = await service.get(service.url("no-such-db-xyz", doc, "file.txt", TOKEN))
    wrong = await service.get(service.url(db, doc, "file.txt", "wrong"))
    for reply in (missing_doc, missing_db):
        assert reply.status == 403
        assert reply.body == wrong.body
        assert reply.header("content-type") == wrong.header("content-type")


@pytest_twisted.ensureDeferred
async def test_missing_attachment_with_a_valid_token_is_404(service, db, doc):
    reply = await service.get(service.url(db, doc, "other.txt", TOKEN))
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"
    wrong = await service.get(service.url(db, doc, "other.txt", "wrong"))
    assert wrong.status == 403


@pytest_twisted.ensureDeferred
async def test_nested_token_field(start_service, admin, db):
    service = await start_service(token_field=("data", "token"))
    admin.put(db, "pouch", {"data": {"token": "nested"}, "download_token": "top"})
    admin.put_attachment(db, "pouch", "a.bin", b"\x00\x01")
    assert (await service.get(service.url(db, "pouch", "a.bin", "nested"))).status == 200
    assert (await service.get(service.url(db, "pouch", "a.bin", "top"))).status == 403
    admin.put(db, "flat", {"data": "not-an-object"})
    admin.put_attachment(db, "flat", "a.bin", b"x")
    assert (await service.get(service.url(db, "flat", "a.bin", "not-an-object"))).status == 403


@pytest_twisted.ensureDeferred
async def test_a_token_list_rotates_tokens(start_service, admin, db):
    # Uncached: with the cache, revocation waits for the _changes feed (CouchDB delivers the
    # change ~1 ms after the PUT returns); test_cache.py covers that latency.
    service = await start_service(cache_size=0)
    admin.put(db, "rot", {"download_token": ["old-token", 42, "new-token"]})
    admin.put_attachment(db, "rot", "f.txt", b"rotating")
    for token, status in (("old-token", 200), ("new-token", 200), ("42", 403), ("other", 403)):
        assert (await service.get(service.url(db, "rot", "f.txt", token))).status == status
    admin.put(db, "rot", {"download_token": ["new-token"]})  # the old one retired
    for token, status in (("old-token", 403), ("new-token", 200)):
        assert (await service.get(service.url(db, "rot", "f.txt", token))).status == status


@pytest_twisted.ensureDeferred
async def test_token_given_twice_is_refused(service, db, doc):
    url = service.url(db, doc, "file.txt", TOKEN) + "&token=" + TOKEN
    reply = await service.get(url)
    assert reply.status == 400


# -- Range --------------------------------------------------------------------

RANGE_BODY = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture
def ranged(admin: CouchAdmin, db: str) -> str:
    admin.put(db, "media", {"download_token": TOKEN})
    admin.put_attachment(db, "media", "clip.bin", RANGE_BODY, "application/octet-stream")
    return "media"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "header,start,stop",
    [
        ("bytes=0-0", 0, 1),
        ("bytes=100-199", 100, 200),
        ("bytes=10000-", 10000, 10240),
        ("bytes=-40", 10200, 10240),
        ("bytes=10200-99999", 10200, 10240),
        ("bytes=-99999", 0, 10240),
    ],
)
async def test_single_range_is_206_with_the_exact_bytes(service, db, ranged, header, start, stop):
    for method in ("GET", "HEAD"):
        reply = await service.get(service.url(db, ranged, "clip.bin", TOKEN), method, {"Range": header})
        assert reply.status == 206
        assert reply.header("content-range") == f"bytes {start}-{stop - 1}/{len(RANGE_BODY)}"
        assert reply.header("content-length") == str(stop - start)
        if method == "GET":
            assert reply.body == RANGE_BODY[start:stop]


@pytest_twisted.ensureDeferred
async def test_unsatisfiable_range_is_416(service, db, ranged):
    reply = await service.get(service.url(db, ranged, "clip.bin", TOKEN), headers={"Range": "bytes=20000-"})
    assert reply.status == 416
    assert reply.header("content-range") == f"bytes */{len(RANGE_BODY)}"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-5", "bytes=garbage", "bytes=9-2"])
async def test_ranges_we_do_not_serve_get_the_whole_body(service, db, ranged, header):
    reply = await service.get(service.url(db, ranged, "clip.bin", TOKEN), headers={"Range": header})
    assert (reply.status, reply.body) == (200, RANGE_BODY)


@pytest_twisted.ensureDeferred
async def test_range_needs_a_valid_token(service, db, ranged):
    reply = await service.get(service.url(db, ranged, "clip.bin", "bad"), headers={"Range": "bytes=0-9"})
    assert reply.status == 403


@pytest_twisted.ensureDeferred
async def test_if_range_with_another_etag_gets_the_whole_body(service, db, ranged):
    headers = {"Range": "bytes=0-9", "If-Range": '"not-the-etag"'}
    reply = await service.get(service.url(db, ranged, "clip.bin", TOKEN), headers=headers)
    assert (reply.status, reply.body) == (200, RANGE_BODY)
    etag = reply.header("etag")
    reply = await service.get(
        service.url(db, ranged, "clip.bin", TOKEN), headers={"Range": "bytes=0-9", "If-Range": etag}
    )
    assert (reply.status, reply.body) == (206, RANGE_BODY[:10])


# -- Conditional requests, CORS, methods ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_if_none_match_with_the_etag_is_304_without_a_body(service, db, doc):
    first = await service.get(service.url(db, doc, "file.txt", TOKEN))
    etag = first.header("etag")
    for header in (etag, f'"x", {etag}', f"W/{etag}", "*"):
        reply = await service.get(service.url(db, doc, "file.txt", TOKEN), headers={"If-None-Match": header})
        assert reply.status == 304
        assert reply.body == b""
        assert reply.header("etag") == etag
    other = await service.get(service.url(db, doc, "file.txt", TOKEN), headers={"If-None-Match": '"other"'})
    assert (other.status, other.body) == (200, BODY)
    stale_token = await service.get(service.url(db, doc, "file.txt", "bad"), headers={"If-None-Match": etag})
    assert stale_token.status == 403


@pytest_twisted.ensureDeferred
async def test_cors_preflight(service, db, doc):
    reply = await service.get(
        service.url(db, doc, "file.txt"),
        "OPTIONS",
        {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range, if-none-match",
        },
    )
    assert reply.status == 204
    assert reply.header("access-control-allow-origin") == "*"
    methods = {m.strip() for m in reply.header("access-control-allow-methods").split(",")}
    assert methods == {"GET", "HEAD", "OPTIONS"}
    allowed = {h.strip().lower() for h in reply.header("access-control-allow-headers").split(",")}
    assert {"range", "if-none-match"} <= allowed
    assert service.couchdb_targets() == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "COPY", "PROPFIND"])
async def test_other_methods_are_405(service, db, doc, method):
    reply = await service.get(service.url(db, doc, "file.txt", TOKEN), method)
    assert reply.status == 405
    assert "GET" in reply.header("allow")
    assert service.couchdb_targets() == []


# -- Bodies ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twenty_mebibytes_arrive_byte_exact(service, admin, db):
    data = os.urandom(20 * 1024 * 1024)
    admin.put(db, "big", {"download_token": TOKEN})
    admin.put_attachment(db, "big", "blob.bin", data, "application/octet-stream")
    reply = await service.get(service.url(db, "big", "blob.bin", TOKEN))
    assert reply.status == 200
    assert len(reply.body) == len(data)
    assert hashlib.sha256(reply.body).digest() == hashlib.sha256(data).digest()


@pytest_twisted.ensureDeferred
async def test_compressed_attachments_pass_through_byte_exact(service, admin, db):
    """A server that stores or sends gzip: the bytes and Content-Encoding reach the client as sent."""
    import gzip

    text = b"compress me " * 20000
    admin.put(db, "text", {"download_token": TOKEN})
    admin.put_attachment(db, "text", "big.txt", text, "text/plain")
    url = service.url(db, "text", "big.txt", TOKEN)
    status, headers, direct = admin.request(
        "GET", admin.doc_path(db, "text") + "/big.txt", headers={"Accept-Encoding": "gzip"}
    )
    reply = await service.get(url, headers={"Accept-Encoding": "gzip"})
    assert reply.status == 200
    assert reply.header("vary") == "Accept-Encoding"
    assert reply.header("content-encoding") == headers.get("content-encoding")
    if reply.header("content-encoding") == "gzip":
        assert gzip.decompress(reply.body) == text
        if reply.header("content-length") is not None:
            assert int(reply.header("content-length")) == len(reply.body)
    else:
        assert reply.body == text
    plain = await service.get(url)
    assert plain.header("content-encoding") is None
    assert plain.body == text
