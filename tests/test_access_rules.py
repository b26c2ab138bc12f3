"""The pure rules that decide access: path parsing, token lookup and comparison, summaries.

Fast unit tests (no server) so that mutation testing can run them for every mutant.
"""

from __future__ import annotations

import pytest

from couchtoken.attachments import AttachmentInfo
from couchtoken.documents import DocumentSummary
from couchtoken.names import (
    MAX_NAME_BYTES,
    AttachmentPath,
    BadPath,
    attachment_path,
    document_path,
    encode_segment,
    parse_download_path,
)
from couchtoken.tokens import document_tokens, token_matches


@pytest.mark.parametrize(
    "raw,expected",
    [
        (b"/db/doc/f.txt", ("db", "doc", "f.txt")),
        (b"/db/dir%2Fdoc/f.txt", ("db", "dir/doc", "f.txt")),
        (b"/db/doc/sub/dir/f.txt", ("db", "doc", "sub/dir/f.txt")),
        (b"/db/doc/a%2Fb", ("db", "doc", "a/b")),
        (b"/a%2Fb/doc/f", ("a/b", "doc", "f")),
        (b"/db/a+b/c+d", ("db", "a+b", "c+d")),
        (b"/db/a%20b/%E6%96%87", ("db", "a b", "文")),
        (b"/db$()+-_x/doc/f", ("db$()+-_x", "doc", "f")),
        (b"/db/..x/x..", ("db", "..x", "x..")),
        (b"/db/_x%5F/f", None),
    ],
)
def test_parsing_download_paths(raw, expected):
    if expected is None:
        with pytest.raises(BadPath) as bad:
            parse_download_path(raw)
        assert bad.value.status == 403
        return
    parsed = parse_download_path(raw)
    assert (parsed.db, parsed.docid, parsed.attachment) == expected
    assert parsed.document_key == expected[:2]


@pytest.mark.parametrize(
    "raw,status",
    [
        (b"db/doc/f", 400),
        (b"", 400),
        (b"/", 400),
        (b"/db", 400),
        (b"/db/doc", 400),
        (b"/db/doc/", 400),
        (b"//doc/f", 400),
        (b"/db//f", 400),
        (b"/db/doc//f", 400),
        (b"/db/./f", 400),
        (b"/db/../f", 400),
        (b"/db/doc/.", 400),
        (b"/db/doc/a/../b", 400),
        (b"/db/%2E%2E/f", 400),
        (b"/db/a%2F..%2Fb/f", 400),
        (b"/db/a%2F.%2Fb/f", 400),
        (b"/db/%00/f", 400),
        (b"/db/doc/a%0Ab", 400),
        (b"/db/doc/a%7Fb", 400),
        (b"/db/doc/a%1Fb", 400),
        (b"/db/%FF/f", 400),
        (b"/DB/doc/f", 400),
        (b"/1db/doc/f", 400),
        (b"/d%20b/doc/f", 400),
        (b"/_users/doc/f", 403),
        (b"/db/_design%2Fx/f", 403),
        (b"/db/_local%2Fx/f", 403),
        (b"/%5Fusers/doc/f", 403),
    ],
)
def test_refusing_malformed_or_forbidden_paths(raw, status):
    with pytest.raises(BadPath) as bad:
        parse_download_path(raw)
    assert bad.value.status == status
    assert bad.value.reason


def test_name_length_limit():
    name = b"a" * MAX_NAME_BYTES
    assert parse_download_path(b"/db/" + name + b"/f").docid == name.decode()
    with pytest.raises(BadPath):
        parse_download_path(b"/db/" + name + b"a/f")
    with pytest.raises(BadPath):
        parse_download_path(b"/db/doc/" + b"%41" * (MAX_NAME_BYTES + 1))


def test_upstream_paths_encode_every_segment():
    assert encode_segment("a/b c+d%") == "a%2Fb%20c%2Bd%25"
    assert document_path("a/b", "x/y+z") == "/a%2Fb/x%2Fy%2Bz"
    target = AttachmentPath(db="db", docid="d/1", attachment="sub dir/f+1.txt")
    assert attachment_path(target) == "/db/d%2F1/sub%20dir/f%2B1.txt"


@pytest.mark.parametrize(
    "document,field,token",
    [
        ({"download_token": "t"}, ("download_token",), ("t",)),
        ({"download_token": ""}, ("download_token",), ()),
        ({"download_token": None}, ("download_token",), ()),
        ({"download_token": 5}, ("download_token",), ()),
        ({"download_token": ["t", "u"]}, ("download_token",), ("t", "u")),
        ({"download_token": ["t", 5, None, "", ["u"], {"v": 1}]}, ("download_token",), ("t",)),
        ({"download_token": []}, ("download_token",), ()),
        ({"download_token": {"t": 1}}, ("download_token",), ()),
        ({}, ("download_token",), ()),
        ({"data": {"token": "n"}}, ("data", "token"), ("n",)),
        ({"data": "n"}, ("data", "token"), ()),
        ({"data": {}}, ("data", "token"), ()),
        ({"data": {"token": "n"}}, ("data",), ()),
    ],
)
def test_finding_the_document_tokens(document, field, token):
    assert document_tokens(document, field) == token


def test_any_listed_token_opens_the_document():
    summary = DocumentSummary.from_document({"download_token": ["old", "new"]}, ("download_token",))
    assert summary.accepts(b"old") and summary.accepts(b"new")
    assert not summary.accepts(b"other")
    assert not DocumentSummary.from_document({"download_token": []}, ("download_token",)).accepts(b"")


def test_comparing_tokens():
    assert token_matches("secret", b"secret")
    assert not token_matches("secret", b"secreT")
    assert not token_matches("secret", b"secre")
    assert not token_matches("secret", b"secrets")
    assert not token_matches("secret", b"")
    assert not token_matches("secret", None)
    assert not token_matches(None, b"secret")
    assert not token_matches("", b"")
    assert token_matches("ünï", "ünï".encode())


def test_summaries():
    document = {
        "_rev": "3-abc",
        "download_token": "s3cr3t-value",
        "_attachments": {
            "a.txt": {"content_type": "text/plain", "length": 5, "digest": "md5-AAA="},
            "bad": "not a stub",
        },
    }
    summary = DocumentSummary.from_document(document, ("download_token",))
    assert summary.rev == "3-abc"
    assert summary.tokens == ("s3cr3t-value",)
    assert summary.accepts(b"s3cr3t-value")
    assert not summary.accepts(b"s3cr3t")
    assert not summary.accepts(None)
    assert list(summary.attachments) == ["a.txt"]
    assert summary.attachments["a.txt"] == AttachmentInfo(b"text/plain", 5, "md5-AAA=")
    assert summary.attachments["a.txt"].etag == '"AAA="'
    empty = DocumentSummary.from_document({"_rev": 7, "_attachments": []}, ("download_token",))
    assert (empty.tokens, empty.rev, dict(empty.attachments)) == ((), None, {})
    assert not empty.accepts(b"")
    assert "s3cr3t" not in repr(summary)
    assert repr(summary) == "DocumentSummary(rev='3-abc', tokens=1, attachments=1)"


def test_attachment_metadata_is_sanitised():
    stub = {"content_type": "text/html\r\nSet-Cookie: x", "length": -1, "digest": 'md5-"x"'}
    info = AttachmentInfo.from_stub(stub)
    assert info.content_type == b"application/octet-stream"
    assert info.length is None
    assert info.etag is None
    assert AttachmentInfo.from_stub({"length": True}).length is None
    assert AttachmentInfo.from_stub({"digest": "sha-xyz"}).etag == '"sha-xyz"'
    assert AttachmentInfo.from_stub({"encoding": "gzip", "encoded_length": 3}).encoded_length == 3


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"db/doc/f", "the path must start with '/'"),
        (b"/db/doc", "expected /<database>/<document>/<attachment>"),
        (b"//doc/f", "the database name is empty"),
        (b"/db//f", "the document id is empty"),
        (b"/db/doc//f", "the attachment name is empty"),
        (b"/db/%FF/f", "the document id is not valid UTF-8"),
        (b"/db/doc/%00", "the attachment name holds a control character"),
        (b"/db/../f", "the document id holds a '.' or '..' segment"),
        (b"/db/" + b"a" * 5000 + b"/f", "the document id is too long"),
        (b"/_users/doc/f", "system databases and documents are not served"),
        (b"/DB/doc/f", "not a valid CouchDB database name"),
    ],
)
def test_refusals_say_what_is_wrong(raw, reason):
    """The reason reaches the client in the 400/403 body: it must name the problem."""
    with pytest.raises(BadPath) as bad:
        parse_download_path(raw)
    assert bad.value.reason == reason
    assert str(bad.value) == reason
