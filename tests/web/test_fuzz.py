"""Property-based fuzzing of the public port, against the real server behind a recording proxy.

Paths (percent-encodings, dot segments, %2F, +, NUL, overlong and non-UTF-8
segments), query strings (repeated, empty, huge tokens) and headers (Range
forms, If-None-Match lists, CRLF attempts, huge values) are sent as raw
bytes.  Properties: no 5xx, nothing but the allowed GETs upstream, no token
or password in any answer or log line, and a 200 only with the right token.

``COUCHTOKEN_FUZZ_EXAMPLES`` sets the number of examples (default 2000).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import ServiceStarter
from tests.http import raw_exchange
from tests.web.test_security import ALLOWED

EXAMPLES = int(os.environ.get("COUCHTOKEN_FUZZ_EXAMPLES", "2000"))
TOKEN = "Fz-" + uuid.uuid4().hex[:16]
BODY = b"fuzz target body"


@pytest.fixture(scope="module")
def target(couch_server):
    """A service with one database, document and attachment; its logs collected."""
    admin = couch_server.admin
    db = f"ct-fuzz-{uuid.uuid4().hex[:8]}"
    admin.create_db(db)
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", BODY, "text/plain")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    starter = ServiceStarter(couch_server)
    service = pytest_twisted.blockon(ensureDeferred(starter.start(feed_heartbeat=0.2)))
    password = couch_server.url.split("@")[0].rsplit(":", 1)[1]
    yield service, db, password, events
    globalLogPublisher.removeObserver(events.append)
    pytest_twisted.blockon(ensureDeferred(starter.stop_all()))
    admin.delete_db(db)


SPECIAL_SEGMENTS = [
    "..",
    ".",
    "%2e%2e",
    "%2E",
    "%2F",
    "a%2Fb",
    "%00",
    "a%00b",
    "_design",
    "_users",
    "_all_docs",
    "%5Fdesign",
    "_changes",
    "%FF",
    "%C3%28",
    "+",
    "a+b",
    "%2B",
    "%20",
    "%",
    "%zz",
    "doc",
    "f.txt",
    "a" * 5000,
    "%0d%0aSet-Cookie:%20x=1",
]
segment = st.one_of(
    st.sampled_from(SPECIAL_SEGMENTS),
    st.text(max_size=12).filter(lambda t: TOKEN not in t).map(lambda t: quote(t, safe="")),
    st.binary(max_size=8).map(lambda b: quote_from_bytes(b, safe="")),
)
token_value = st.one_of(
    st.just(TOKEN),
    st.sampled_from(["", "wrong", TOKEN.upper(), TOKEN + "x", TOKEN[:-1], "%00", "a" * 10000]),
    st.text(max_size=20).filter(lambda t: TOKEN not in t).map(lambda t: quote(t, safe="")),
)
range_value = st.one_of(
    st.sampled_from(
        [
            "bytes=0-0",
            "bytes=0-",
            "bytes=-5",
            "bytes=5-2",
            "bytes=0-1,3-4",
            "bytes=999-",
            "bytes=-0",
            "bytes=a-b",
            "items=0-1",
            "bytes=" + "9" * 100 + "-",
            "bytes=0-" + "9" * 100,
            "",
        ]
    ),
    st.text(alphabet="bytes=-,0123456789 ", max_size=30),
)
header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200).filter(
    lambda t: TOKEN not in t
)


@st.composite
def requests(draw):
    service_db = draw(st.sampled_from(["DB", "DB", "other-db", "_users"]))
    segments = [service_db] + draw(st.lists(segment, min_size=0, max_size=4))
    if draw(st.booleans()):
        segments[1:3] = ["doc", "f.txt"]
    path = "/" + "/".join(segments)
    tokens = draw(st.lists(token_value, min_size=0, max_size=3))
    query = "&".join(f"token={t}" for t in tokens)
    extra = draw(
        st.sampled_from(["", "download=1", "rev=1-abc", "attachments=true", "token", "&&", ";token=x"])
    )
    if extra:
        query = f"{query}&{extra}" if query else extra
    headers = {}
    if draw(st.booleans()):
        headers["Range"] = draw(range_value)
    if draw(st.booleans()):
        headers["If-None-Match"] = draw(
            st.sampled_from(['"x"', "*", 'W/"y", "z"', "", '"' + "e" * 500 + '"'])
        )
    if draw(st.booleans()):
        headers["X-Junk"] = draw(header_value)
    if draw(st.booleans()):
        headers["If-Range"] = draw(header_value)
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "OPTIONS", "POST", "DELETE"]))
    return method, path, query, headers, tokens


def _send(port: int, method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def check_one(target, request) -> None:
    """Send one fuzzed request (from a worker thread) and check every property."""
    service, db, password, _ = target
    method, path, query, headers, tokens = request
    path = path.replace("/DB", "/" + db, 1)
    uri = path + ("?" + query if query else "")
    port = int(service.base_url.rsplit(":", 1)[1])
    seen_before = len(service.proxy.requests)
    answer = _send(port, method, uri, headers)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, (uri, headers, answer[:300])
    assert TOKEN.encode() not in answer and password.encode() not in answer
    assert b"Traceback" not in answer
    if status in (200, 206, 304) and method != "OPTIONS":
        decoded = [unquote_to_bytes(t.replace("+", " ")) for t in tokens]
        assert decoded == [TOKEN.encode()], (uri, status)
    for request_seen in service.proxy.requests[seen_before:]:
        line = f"{request_seen.method} {request_seen.target}"
        assert ALLOWED.match(line), line


@pytest_twisted.ensureDeferred
async def test_fuzzed_requests_keep_every_promise(target, capsys):
    """Hypothesis drives raw requests from a worker thread while the reactor serves them."""
    sent = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    @given(request=requests())
    def fuzz(request):
        sent.append(request[0])
        check_one(target, request)

    await threads.deferToThread(fuzz)
    with capsys.disabled():
        print(f"\n[fuzz] {len(sent)} requests sent, every property held")
    assert len(sent) >= EXAMPLES


def test_the_logs_never_held_a_token_or_password(target):
    """Runs after the fuzzing above (same module fixture): every log line it produced."""
    service, db, password, events = target
    assert events, "no log events were collected"
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert TOKEN not in text
    assert password not in text
