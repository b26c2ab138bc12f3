"""The pure rules that decide access: path parsing, token lookup and comparison, summaries.

Fast unit tests (no server) so that mutation testing can run them for every mutant.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from couchtoken.access.attachments import AttachmentInfo
from couchtoken.access.documents import DocumentSummary
from couchtoken.access.links import (
    MIN_SIGNING_TOKEN_LENGTH,
    Signature,
    check_signature,
    sign_url,
    signature,
    signature_matches,
)
from couchtoken.access.mediatypes import TypeSet, essence, is_passive, parse_type_option
from couchtoken.access.names import (
    MAX_NAME_BYTES,
    AttachmentPath,
    BadPath,
    attachment_path,
    document_path,
    encode_segment,
    parse_download_path,
)
from couchtoken.access.throttle import GuessThrottle, Throttled
from couchtoken.access.tokens import document_tokens, token_matches


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
    for garbage in ("text/plain,text/html", "text/plain; x=é", 5, "", None):
        assert AttachmentInfo.from_stub({"content_type": garbage}).content_type == b"application/octet-stream"
    assert AttachmentInfo.from_stub({}).content_type == b"application/octet-stream"
    spaced = AttachmentInfo.from_stub({"content_type": " TEXT/HTML; charset=utf-8 "})
    assert spaced.content_type == b"TEXT/HTML; charset=utf-8"
    assert info.length is None
    assert info.etag is None
    assert AttachmentInfo.from_stub({"length": True}).length is None
    assert AttachmentInfo.from_stub({"digest": "sha-xyz"}).etag == '"sha-xyz"'
    assert AttachmentInfo.from_stub({"encoding": "gzip", "encoded_length": 3}).encoded_length == 3


@pytest.mark.parametrize(
    "raw,kind",
    [
        (b"text/plain", "text/plain"),
        (b"Text/HTML", "text/html"),
        (b"  image/png\t", "image/png"),
        (b"TEXT/X", "text/x"),
        (b"text/plain\n", None),
        (b"\x0btext/plain", None),
        (b"text/plain; charset=utf-8", "text/plain"),
        (b"text/plain;charset=utf-8;format=flowed", "text/plain"),
        (b"text/plain \t; \tcharset=utf-8", "text/plain"),
        (b"text/plain;", "text/plain"),
        (b"text/plain; ;x=y", "text/plain"),
        (b'text/plain; name="a b;c\\"d"', "text/plain"),
        (b'text/plain; name=""', "text/plain"),
        (b"application/vnd.a+b-c_d.e!#$%&'*^`|~1", "application/vnd.a+b-c_d.e!#$%&'*^`|~1"),
        (b"text/plain,text/html", None),
        (b"text/plain, text/html", None),
        (b'text/plain; name="a,text/html"', None),
        (b"text/plain;charset=utf-8,text/html", None),
        (b"text/plain text/html", None),
        (b"text/plain;text/html", None),
        (b"text/plain; charset", None),
        (b"text/plain; charset=", None),
        (b"text/plain; charset=a b", None),
        (b"text/plain; =utf-8", None),
        (b'text/plain; name="unterminated', None),
        (b'text/plain; name="a"b', None),
        (b"text/plain; name=\xc3\xa9", None),
        (b"text/pl\xc3\xa4in", None),
        (b"text/html\r\nSet-Cookie: x", None),
        (b"text/html\x00", None),
        (b"text", None),
        (b"text/", None),
        (b"/html", None),
        (b"text/html/x", None),
        (b"text /html", None),
        (b"text/(html)", None),
        (b"", None),
        (b";", None),
    ],
)
def test_strict_media_types(raw, kind):
    assert essence(raw) == kind


def test_passive_types_and_type_options():
    for kind in ("image/png", "image/jpeg", "image/gif", "image/webp", "image/avif", "image/bmp"):
        assert is_passive(kind), kind
    for kind in ("image/x-icon", "image/vnd.microsoft.icon", "application/pdf", "text/plain", "text/csv"):
        assert is_passive(kind), kind
    for kind in ("audio/wav", "audio/mpeg", "video/mp4", "video/webm"):
        assert is_passive(kind), kind
    for kind in ("text/html", "text/xsl", "image/svg+xml", "application/json", "text/xml", "xaudio/wav"):
        assert not is_passive(kind), kind
    assert not is_passive("application/octet-stream") and not is_passive("audiox/y")
    types = TypeSet([" Text/Plain ", "video/*"])
    assert "text/plain" in types and "video/mp4" in types and "video/*" in types
    assert "text/csv" not in types and "audio/mp4" not in types and "image/png" not in TypeSet()
    assert parse_type_option(" Image/PNG ") == "image/png"
    assert parse_type_option("a/*") == "a/*"
    for bad in ("text/plain; charset=utf-8", "text", "*/*", "*/plain", "text/plain,text/html", "a b/c"):
        with pytest.raises(ValueError) as refused:
            parse_type_option(bad)
        assert str(refused.value) == f"{bad!r} is not a media type (type/subtype)"


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


# -- Signed links and guess throttling --------------------------------------------------


NEW = "new-token-0123456"  # 17 characters
OLD = "old-token-0123456"


def test_signed_link_checks():
    sig = signature(NEW, "db", "d/1", "a b.txt", 1700000000).encode()
    assert len(sig) == 64
    assert signature_matches((OLD, NEW), "db", "d/1", "a b.txt", 1700000000, sig)
    assert signature_matches((NEW,), "db", "d/1", "a b.txt", 1700000000, sig.upper())
    assert not signature_matches((OLD,), "db", "d/1", "a b.txt", 1700000000, sig)
    assert not signature_matches((), "db", "d/1", "a b.txt", 1700000000, sig)
    assert not signature_matches((NEW,), "db", "d/1", "a b.txt", 1700000001, sig)
    assert not signature_matches((NEW,), "db", "d/1", "a b.txt", 1700000000, sig[:-1])
    for changed in (("db2", "d/1", "a b.txt"), ("db", "d/2", "a b.txt"), ("db", "d/1", "a b.txd")):
        assert not signature_matches((NEW,), *changed, 1700000000, sig)
    url = sign_url("https://h/", "db", "d/1", "x/a b.txt", NEW, 1700000000)
    expected = signature(NEW, "db", "d/1", "x/a b.txt", 1700000000)
    assert url == f"https://h/db/d%2F1/x/a%20b.txt?expires=1700000000&sig={expected}"


def test_only_tokens_of_16_characters_or_more_sign_links():
    assert MIN_SIGNING_TOKEN_LENGTH == 16
    fifteen, sixteen = "t" * 15, "u" * 16
    by_15 = signature(fifteen, "db", "d", "f", 1).encode()
    by_16 = signature(sixteen, "db", "d", "f", 1).encode()
    assert check_signature((sixteen,), "db", "d", "f", 1, by_16) is Signature.VALID
    assert check_signature((fifteen,), "db", "d", "f", 1, by_15) is Signature.SHORT_TOKEN
    assert check_signature((fifteen, sixteen), "db", "d", "f", 1, by_15) is Signature.SHORT_TOKEN
    assert check_signature((fifteen, "v" * 15), "db", "d", "f", 1, by_15) is Signature.SHORT_TOKEN
    assert check_signature((fifteen, sixteen), "db", "d", "f", 1, by_16) is Signature.VALID
    assert check_signature((sixteen, fifteen), "db", "d", "f", 1, by_16) is Signature.VALID
    assert check_signature((fifteen,), "db", "d", "f", 1, by_16) is Signature.INVALID
    assert check_signature((sixteen,), "db", "d", "f", 1, by_15) is Signature.INVALID
    assert check_signature((), "db", "d", "f", 1, by_16) is Signature.INVALID
    assert not signature_matches((fifteen,), "db", "d", "f", 1, by_15)
    assert signature_matches((fifteen, sixteen), "db", "d", "f", 1, by_16)
    # The length is counted in characters, not bytes.
    short_unicode = "é" * 15  # 30 bytes in UTF-8
    by_unicode = signature(short_unicode, "db", "d", "f", 1).encode()
    assert check_signature((short_unicode,), "db", "d", "f", 1, by_unicode) is Signature.SHORT_TOKEN


class _Request:
    def __init__(self, peer: str | None, forwarded: str | None = None, address: object = None) -> None:
        self._address = address or type("Address", (), {"host": peer})()
        self.requestHeaders = Headers({b"x-forwarded-for": [forwarded.encode()]} if forwarded else {})

    def getClientAddress(self):
        return self._address


def _throttled(throttle: GuessThrottle, client: str, document: tuple[str, str]) -> int | None:
    """The Retry-After a new check would get, or None (the check then counts as passed)."""
    try:
        throttle.start(client, document).passed()
    except Throttled as throttled:
        assert str(throttled) == f"retry after {throttled.retry_after}s"
        return throttled.retry_after
    return None


def test_failures_count_per_client_and_document_in_windows_on_the_clock():
    clock = Clock()
    throttle = GuessThrottle(clock, 2, window=60)
    doc = ("db", "x")
    throttle.start("a", doc).failed()
    clock.advance(10)
    throttle.start("a", doc).failed()
    assert _throttled(throttle, "a", doc) == 50
    # Another document, another database, another client: a budget of their own.
    for client, other in (("a", ("db", "y")), ("a", ("db2", "x")), ("a", ("dbx", "")), ("b", doc)):
        assert _throttled(throttle, client, other) is None
        throttle.start(client, other).failed()
        throttle.start(client, other).failed()
        assert _throttled(throttle, client, other) == 60  # its window started at 10 s
    clock.advance(50.5)
    assert _throttled(throttle, "a", doc) is None
    throttle.start("a", doc).failed()
    assert _throttled(throttle, "a", doc) is None
    throttle.start("a", doc).failed()
    assert _throttled(throttle, "a", doc) == 60


def test_checks_under_way_count_until_they_pass():
    clock = Clock()
    throttle = GuessThrottle(clock, 2)
    doc = ("db", "x")
    for _ in range(10):
        throttle.start("a", doc).passed()  # checks that pass use up nothing
    first, second = throttle.start("a", doc), throttle.start("a", doc)
    assert _throttled(throttle, "a", doc) == 60  # a burst cannot slip past the budget
    first.passed()
    first.passed()  # only the first call gives the slot back
    third = throttle.start("a", doc)
    assert _throttled(throttle, "a", doc) == 60
    second.failed()
    second.passed()  # a failure stays counted
    assert _throttled(throttle, "a", doc) == 60
    third.passed()
    assert _throttled(throttle, "a", doc) is None


def test_a_looser_ceiling_per_client_across_documents():
    clock = Clock()
    throttle = GuessThrottle(clock, 1, max_client_failures=2, window=60)
    throttle.start("a", ("db", "d1")).failed()
    clock.advance(30)
    throttle.start("a", ("db", "d2")).failed()
    clock.advance(1)
    assert _throttled(throttle, "a", ("db", "d2")) == 59  # both over: the later window decides
    assert _throttled(throttle, "a", ("db", "d3")) == 29  # the ceiling, for every document
    assert _throttled(throttle, "b", ("db", "d3")) is None
    under_way = throttle.start("b", ("db", "d4"))
    throttle.start("b", ("db", "d5")).failed()
    assert _throttled(throttle, "b", ("db", "d6")) == 60
    under_way.passed()
    assert _throttled(throttle, "b", ("db", "d6")) is None
    clock.advance(29.5)
    assert _throttled(throttle, "a", ("db", "d3")) is None  # the client's window is over
    assert _throttled(throttle, "a", ("db", "d2")) == 30
    one = GuessThrottle(clock, 5, max_client_failures=1)
    one.start("c", ("db", "d1")).failed()
    assert _throttled(one, "c", ("db", "d2")) == 60
    clock.advance(59.5)
    assert _throttled(one, "c", ("db", "d2")) == 1  # never 0


def test_zero_turns_limits_off():
    clock = Clock()
    off = GuessThrottle(clock, 0, max_client_failures=1)
    for _ in range(100):
        off.start("a", ("db", "x")).failed()
    assert _throttled(off, "a", ("db", "x")) is None
    no_ceiling = GuessThrottle(clock, 1)
    for i in range(100):
        no_ceiling.start("a", ("db", f"d{i}")).failed()
    assert _throttled(no_ceiling, "a", ("db", "fresh")) is None
    assert _throttled(no_ceiling, "a", ("db", "d0")) == 60


def test_clients_behind_trusted_proxies():
    clock = Clock()
    behind = GuessThrottle(clock, 1, trusted_proxies=["10.0.0.0/8", " 127.0.0.1 ", ""])
    assert behind.client(_Request("127.0.0.1", "203.0.113.5, 10.1.2.3")) == "203.0.113.5"
    assert behind.client(_Request("203.0.113.9", "198.51.100.1")) == "203.0.113.9"
    assert behind.client(_Request("127.0.0.1", "not-an-ip")) == "not-an-ip"
    assert behind.client(_Request("127.0.0.1")) == "127.0.0.1"
    assert behind.client(_Request("127.0.0.1", "10.0.0.1, 10.0.0.2")) == "127.0.0.1"
    proxies = GuessThrottle(clock, 1, trusted_proxies=["127.0.0.1/8"])  # host bits set: still a network
    request = _Request("127.0.0.2", "203.0.113.1, 198.51.100.2")
    request.requestHeaders.addRawHeader(b"x-forwarded-for", b"127.0.0.3")  # a second header line
    assert proxies.client(request) == "198.51.100.2"
    assert proxies.client(_Request(None)) == ""
    nameless = type("Request", (), {"getClientAddress": lambda self: object()})()
    assert proxies.client(nameless) == ""


def test_unix_socket_peers_are_one_client_unless_trusted():
    unix = UNIXAddress(None)
    plain = GuessThrottle(Clock(), 1, trusted_proxies=["127.0.0.1"])
    assert plain.client(_Request(None, "203.0.113.5", address=unix)) == "unix"
    trusting = GuessThrottle(Clock(), 1, trusted_proxies=["unix"])
    assert trusting.client(_Request(None, "203.0.113.5", address=unix)) == "203.0.113.5"
    assert trusting.client(_Request(None, None, address=unix)) == "unix"
    assert trusting.client(_Request("127.0.0.1", "203.0.113.5")) == "127.0.0.1"
    with_networks = GuessThrottle(Clock(), 1, trusted_proxies=["unix", "10.0.0.0/8"])
    assert with_networks.client(_Request(None, "203.0.113.5, 10.0.0.1", address=unix)) == "203.0.113.5"
    assert with_networks.client(_Request("10.0.0.2", "203.0.113.6")) == "203.0.113.6"


def test_signed_link_details():
    sig = signature(NEW, "a/b", "d", "f", 1).encode()
    # The matching token may come first in a rotation list.
    assert signature_matches((NEW, OLD), "a/b", "d", "f", 1, sig)
    assert sign_url("https://BOX", "a/b", "d", "f", NEW, 1).startswith("https://BOX/a%2Fb/d/f?")


def _summary_of(attachments: int) -> DocumentSummary:
    stub = {
        "content_type": "image/png",
        "length": 10,
        "digest": "md5-AAAAAAAAAAAAAAAAAAAAAA==",
        "encoding": "gzip",
    }
    document = {
        "_rev": "3-abc",
        "download_token": ["first-token", "second-token"],
        "_attachments": {f"photo-{i}.png": dict(stub) for i in range(attachments)},
    }
    return DocumentSummary.from_document(document, ("download_token",))


def test_a_summary_knows_the_bytes_it_holds():
    """The cache's byte bound rests on this estimate: exact for a known document, never low."""
    import sys
    import tracemalloc

    one = _summary_of(1)
    name, info = next(iter(one.attachments.items()))
    strings = sum(sys.getsizeof(s) for s in (*one.tokens, one.rev))
    per_attachment = 240 + sum(
        sys.getsizeof(s) for s in (name, info.content_type, info.digest, info.encoding)
    )
    assert one.size == 1000 + strings + per_attachment
    assert _summary_of(0).size == 1000 + strings
    assert _summary_of(101).size - _summary_of(100).size == per_attachment - sys.getsizeof(
        "photo-0.png"
    ) + sys.getsizeof("photo-100.png")
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    big = _summary_of(2000)
    held = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert held <= big.size <= 3 * held, (held, big.size)
    untokened = DocumentSummary.from_document(
        {"_attachments": {"a": {"content_type": "text/plain"}}}, ("download_token",)
    )
    assert untokened.attachments == {} and untokened.size == 1000 + sys.getsizeof(None)
