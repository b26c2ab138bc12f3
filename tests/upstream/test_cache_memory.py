"""The token cache is bounded in bytes (--cache-bytes) as well as in entries (--cache-size).

A document's attachment metadata is what makes an entry big: a document with thousands
of attachments is megabytes in memory.  The byte estimate behind the bound is checked
against what Python really allocates (tracemalloc).
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc

import pytest
import pytest_twisted

from couchtoken.access.documents import DocumentSummary
from tests.http import fetch
from tests.upstream.test_cache import HEARTBEAT, doc_requests, warm
from tests.waiting import wait_until

TOKEN = "memory"
FIELD = ("download_token",)


def many_attachments(count: int, name_length: int = 100) -> dict:
    stem = "n" * name_length
    return {f"{stem}-{i:05d}.png": {"content_type": "image/png", "data": "eA=="} for i in range(count)}


def stubs(count: int, name: str = "attachment-%05d.png", encoding: bool = False) -> dict:
    found = {}
    for i in range(count):
        stub = {"content_type": "image/png", "digest": "md5-" + "A" * 22 + "==", "length": 12345 + i}
        if encoding:
            stub.update(encoding="gzip", encoded_length=9999 + i)
        found[name % i] = {**stub, "revpos": 2, "stub": True}
    return found


@pytest_twisted.ensureDeferred
async def test_documents_with_thousands_of_attachments_stay_within_cache_bytes(start_service, admin, db):
    bound = 1024 * 1024
    service = await start_service(feed_heartbeat=HEARTBEAT, cache_bytes=bound)
    docids = [f"album-{i}" for i in range(5)]
    for docid in docids:  # each about half a MiB in memory
        admin.json("PUT", f"/{db}/{docid}", {"download_token": TOKEN, "_attachments": many_attachments(1000)})
    for docid in docids:
        await warm(service, db, docid, f"{'n' * 100}-00001.png", token=TOKEN)
        assert service.app.documents.bytes_held <= bound
    assert 1 <= len(service.app.documents) <= 2
    last = docids[-1]
    before = len(doc_requests(service, db, last))
    reply = await fetch(service.url(db, last, f"{'n' * 100}-00999.png", TOKEN))
    assert (reply.status, reply.body) == (200, b"x")
    assert len(doc_requests(service, db, last)) == before, "the latest document is still cached"
    metrics = (await fetch(f"{service.ops_url}/_metrics")).body.decode()
    held = next(line for line in metrics.splitlines() if line.startswith("couchtoken_cache_bytes "))
    assert 0 < float(held.split()[1]) <= bound


@pytest_twisted.ensureDeferred
async def test_a_document_without_a_token_is_cached_without_its_attachments(start_service, admin, db):
    service = await start_service(feed_heartbeat=HEARTBEAT)
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", b"x")
    await warm(service, db, "doc", "f.txt", token=TOKEN)
    admin.json("PUT", f"/{db}/tokenless", {"_attachments": many_attachments(1000)})
    before = service.app.documents.bytes_held

    async def refusal_cached() -> bool:  # a fetch racing the feed's report of the PUT is not kept
        seen = len(doc_requests(service, db, "tokenless"))
        assert (await fetch(service.url(db, "tokenless", f"{'n' * 100}-00001.png", "guess"))).status == 403
        return len(doc_requests(service, db, "tokenless")) == seen

    assert await wait_until(refusal_cached, 3), "the refusal is never cached"
    assert service.app.documents.bytes_held - before < 2048


@pytest.mark.parametrize(
    "attachments,token",
    [
        ({}, "t" * 32),
        (stubs(1), "t"),
        (stubs(5), "t"),
        (stubs(30_000), "t" * 32),
        (stubs(3_000, "фото-%05d-" + "x" * 100 + ".png"), "t"),
        (stubs(20_000, "%d", encoding=True), "t"),
        (stubs(20_000, "😀%d"), ["a" * 40, "b" * 40]),
    ],
    ids=["none", "one", "five", "30000-tiny", "3000-long-names", "20000-gzip", "20000-emoji"],
)
def test_the_size_estimate_is_never_below_what_python_allocates(attachments, token):
    raw = json.dumps(
        {"_id": "d", "_rev": "3-" + "a" * 32, "download_token": token, "_attachments": attachments}
    )
    gc.collect()
    tracemalloc.start()
    try:
        document = json.loads(raw)
        summary = DocumentSummary.from_document(document, FIELD)
        del document
        gc.collect()
        allocated, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert allocated <= summary.size, f"estimate {summary.size} below {allocated}"
    if attachments and len(attachments) > 100:
        assert summary.size < 1.6 * allocated, "the estimate is too far above"


def test_30000_tiny_attachments_are_about_ten_megabytes():
    started = time.monotonic()
    summary = DocumentSummary.from_document({"download_token": "t", "_attachments": stubs(30_000)}, FIELD)
    assert 9 * 2**20 < summary.size < 16 * 2**20
    assert time.monotonic() - started < 5
