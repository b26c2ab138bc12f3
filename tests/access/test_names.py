"""Names as CouchDB allows them: slashes, spaces, plus signs, Unicode."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import pytest_twisted

from couchtoken.upstream.client import DOCUMENT_QUERY

TOKEN = "tok"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "docid,attachment",
    [
        ("dir/doc", "file.txt"),
        ("doc", "sub/dir/file.txt"),
        ("a b+c", "x y+z.txt"),
        ("ünïcødé-文档", "фото 📷.jpg"),
        ("100%", "50% off;a=b?.txt"),
        ("dots..in..id", "..hidden.txt"),
    ],
)
async def test_names_reach_the_right_attachment(service, admin, db, docid, attachment):
    data = f"{docid}|{attachment}".encode()
    admin.put(db, docid, {"download_token": TOKEN})
    admin.put_attachment(db, docid, attachment, data, "text/plain")
    reply = await service.get(service.url(db, docid, attachment, TOKEN))
    assert (reply.status, reply.body) == (200, data)
    doc_targets = [t for t in service.couchdb_targets() if DOCUMENT_QUERY in t]
    assert doc_targets == [f"GET /{quote(db, safe='')}/{quote(docid, safe='')}?{DOCUMENT_QUERY}"]


@pytest_twisted.ensureDeferred
async def test_a_raw_slash_in_the_attachment_and_an_encoded_one_are_the_same(service, admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "sub/dir/file.txt", b"nested")
    raw = await service.get(f"{service.base_url}/{db}/doc/sub/dir/file.txt?token={TOKEN}")
    encoded = await service.get(f"{service.base_url}/{db}/doc/sub%2Fdir%2Ffile.txt?token={TOKEN}")
    assert (raw.status, raw.body) == (encoded.status, encoded.body) == (200, b"nested")


@pytest_twisted.ensureDeferred
async def test_a_plus_in_a_name_is_a_plus_not_a_space(service, admin, db):
    admin.put(db, "a+b", {"download_token": TOKEN})
    admin.put_attachment(db, "a+b", "c+d.txt", b"plus")
    admin.put(db, "a b", {"download_token": TOKEN})
    admin.put_attachment(db, "a b", "c d.txt", b"space")
    plus = await service.get(f"{service.base_url}/{db}/a+b/c+d.txt?token={TOKEN}")
    space = await service.get(f"{service.base_url}/{db}/a%20b/c%20d.txt?token={TOKEN}")
    assert (plus.status, plus.body) == (200, b"plus")
    assert (space.status, space.body) == (200, b"space")


@pytest_twisted.ensureDeferred
async def test_database_names_with_every_allowed_character(service, admin):
    db = "ct_$()+-x/y"
    admin.create_db(db)
    try:
        admin.put(db, "doc", {"download_token": TOKEN})
        admin.put_attachment(db, "doc", "f.txt", b"odd db")
        reply = await service.get(service.url(db, "doc", "f.txt", TOKEN))
        assert (reply.status, reply.body) == (200, b"odd db")
        assert f"GET /{quote(db, safe='')}/doc?{DOCUMENT_QUERY}" in service.couchdb_targets()
    finally:
        admin.delete_db(db)


@pytest_twisted.ensureDeferred
async def test_a_token_with_reserved_characters_works_when_url_encoded(service, admin, db):
    token = "a+b/c=d&e f%"
    admin.put(db, "doc", {"download_token": token})
    admin.put_attachment(db, "doc", "f.txt", b"ok")
    assert (await service.get(service.url(db, "doc", "f.txt", token))).status == 200
    raw = await service.get(f"{service.base_url}/{db}/doc/f.txt?token=a+b/c=d")
    assert raw.status == 403
