"""Tokens and the admin password never appear in logs, error bodies or reprs."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.logger import formatEvent

from couchtoken.dev.pouchdb import free_port
from couchtoken.ops.settings import Settings
from couchtoken.upstream.server import ConfigError, CouchDBServer
from couchtoken.web.accesslog import redact_uri
from tests.faultproxy import Fault

TOKEN = "Tk-9f8e7d6c5b4a"
PASSWORD = "pw-Unguessable-42"


def _texts(events) -> str:
    parts = []
    for event in events:
        parts.append(formatEvent(event))
        parts.append(repr(event))
        if "log_failure" in event:
            parts.append(event["log_failure"].getTraceback())
    return "\n".join(parts)


@pytest_twisted.ensureDeferred
async def test_no_token_or_password_in_any_log_line(start_service, couch_server, admin, db, logged):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "f.txt", b"data")
    service = await start_service()
    for token in (TOKEN, TOKEN + "-wrong"):
        await service.get(service.url(db, "doc", "f.txt", token))
        await service.get(service.url(db, "doc", "f.txt", token), headers={"Range": "bytes=0-1"})
        await service.get(f"{service.base_url}/{db}/doc/f.txt?%74oken={token}&token={token}")
    service.proxy.fault = Fault("garbage")
    await service.get(service.url(db, "doc", "f.txt", TOKEN))
    service.proxy.fault = None
    dead = await start_service(couchdb_url=f"http://admin:{PASSWORD}@127.0.0.1:{free_port()}")
    reply = await dead.get(dead.url(db, "doc", "f.txt", TOKEN))
    assert reply.status == 502
    assert PASSWORD.encode() not in reply.body and TOKEN.encode() not in reply.body
    text = _texts(logged)
    assert "token=REDACTED" in text
    assert TOKEN not in text
    assert PASSWORD not in text
    assert couch_server.url.split("@")[0].rsplit(":", 1)[1] not in text  # the admin password


def test_redaction_covers_encoded_and_repeated_keys():
    uri = b"/db/doc/f.txt?token=abc&download=1&%74oken=def&x=ghi;token=jkl&tok+en=mno"
    redacted = redact_uri(uri)
    for secret in ("abc", "def", "ghi", "jkl", "mno"):
        assert secret not in redacted
    assert "download=1" in redacted
    assert redacted.startswith("/db/doc/f.txt?token=REDACTED")


def test_credentials_stay_out_of_repr_str_and_errors():
    server = CouchDBServer.from_url(f"http://admin:{PASSWORD}@couch.internal:5984/prefix/")
    assert server.base_url == "http://couch.internal:5984/prefix"
    assert server.authorization.startswith(b"Basic ")
    settings = Settings(couchdb=server)
    for text in (repr(server), str(server), repr(settings), settings.describe()):
        assert PASSWORD not in text
        assert "<credentials>" in text
    for bad in (
        f"ftp://admin:{PASSWORD}@h",
        f"http://admin:{PASSWORD}@h:notaport",
        f"http://a:{PASSWORD}@h/?q=1",
    ):
        with pytest.raises(ConfigError) as caught:
            CouchDBServer.from_url(bad)
        assert PASSWORD not in str(caught.value)


def test_percent_encoded_credentials_are_decoded():
    server = CouchDBServer.from_url("http://ad%40min:p%3Ass%2Fword@127.0.0.1:5984")
    import base64

    assert base64.b64decode(server.authorization.split()[1]) == b"ad@min:p:ss/word"
