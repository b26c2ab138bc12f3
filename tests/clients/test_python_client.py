"""couchtoken.client: links the service parses back into the same names, and that work against it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from couchtoken.access.links import MIN_SIGNING_TOKEN_LENGTH, signature, signature_matches
from couchtoken.access.names import parse_download_path
from couchtoken.client import auth_headers, download_url, new_token, signed_url
from couchtoken.dev.pouchdb import ROOT
from couchtoken.web.query import parse_query
from tests.clients import strategies
from tests.clients.conftest import TOKEN
from tests.http import fetch

LONG_TOKEN = "0123456789abcdef-token"


def parsed(url: str, prefix: str = "") -> tuple[tuple[str, str, str], dict[bytes, list[bytes]]]:
    """What the service reads from a link (behind a proxy that strips ``prefix``): names and query."""
    parts = urlsplit(url)
    assert parts.path.startswith(prefix + "/")
    target = parse_download_path(parts.path.removeprefix(prefix).encode("ascii"))
    return (target.db, target.docid, target.attachment), parse_query(parts.query.encode("ascii"))


def test_a_doc_ids_slash_is_encoded_and_an_attachments_slash_kept():
    url = download_url("https://files.example/", "db", "user/42", "photos/a+b c é?#.png", "t+k n")
    assert url == "https://files.example/db/user%2F42/photos/a%2Bb%20c%20%C3%A9%3F%23.png?token=t%2Bk%20n"
    assert download_url("http://h", "db", "d", "f") == "http://h/db/d/f"
    assert download_url("http://h", "db", "d", "f", download=True) == "http://h/db/d/f?download=1"
    assert (
        download_url("http://h", "db", "d", "f", "t", download=True) == "http://h/db/d/f?token=t&download=1"
    )


def test_names_are_kept_as_given():
    assert download_url("", "db", "caf\u00e9", "x") == "/db/caf%C3%A9/x"
    assert download_url("", "db", "cafe\u0301", "x") == "/db/cafe%CC%81/x"


@pytest.mark.parametrize(
    "names",
    [
        ("Db", "d", "f"),
        ("_users", "d", "f"),
        ("db", "_design/x", "f"),
        ("db", "", "f"),
        ("db", "d", ""),
        ("db", "d", "a//b"),
        ("db", "d", "a/../b"),
        ("db", "a/./b", "f"),
        ("db", "d", "tab\there"),
        ("db", "d", "\ud800"),
        ("db", "x" * 4097, "f"),
    ],
)
def test_names_the_service_refuses_are_refused(names):
    with pytest.raises(ValueError):
        download_url("http://h", *names, TOKEN)
    with pytest.raises(ValueError):
        signed_url("http://h", *names, LONG_TOKEN, 1)


def test_signed_url_is_the_services_signature():
    url = signed_url("https://h/", "db", "d/1", "a b/é.txt", LONG_TOKEN, 1700000000)
    sig = signature(LONG_TOKEN, "db", "d/1", "a b/é.txt", 1700000000)
    assert url == f"https://h/db/d%2F1/a%20b/%C3%A9.txt?expires=1700000000&sig={sig}"
    moment = datetime(2023, 11, 14, 22, 13, 20, 999000, tzinfo=UTC)
    assert signed_url("https://h", "db", "d/1", "a b/é.txt", LONG_TOKEN, moment) == url
    east = moment.astimezone(timezone(timedelta(hours=5)))
    assert signed_url("https://h", "db", "d/1", "a b/é.txt", LONG_TOKEN, east) == url
    assert signed_url("https://h", "db", "d", "f", LONG_TOKEN, 1, download=True).endswith("&download=1")


@pytest.mark.parametrize(
    "token,expires",
    [
        ("x" * (MIN_SIGNING_TOKEN_LENGTH - 1), 1),
        ("", 1),
        ("\ud800" * 16, 1),
        (LONG_TOKEN, -1),
        (LONG_TOKEN, 10**12),
        (LONG_TOKEN, datetime(2030, 1, 1)),  # naive: whose midnight?
    ],
)
def test_signing_refuses_what_the_service_would(token, expires):
    with pytest.raises(ValueError) as refused:
        signed_url("http://h", "db", "d", "f", token, expires)
    assert not token or token not in str(refused.value)


@pytest.mark.parametrize("expires", [1.5, True, "1700000000", None])
def test_expiry_is_whole_unix_seconds(expires):
    with pytest.raises(TypeError):
        signed_url("http://h", "db", "d", "f", LONG_TOKEN, expires)


def test_sixteen_characters_are_enough_to_sign():
    assert MIN_SIGNING_TOKEN_LENGTH == 16
    assert "sig=" in signed_url("http://h", "db", "d", "f", "x" * 16, 1)
    assert "sig=" in signed_url("http://h", "db", "d", "f", "é" * 16, 1)  # characters, not bytes


def test_new_tokens_are_128_random_bits():
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", t) for t in tokens)


def test_auth_headers():
    assert auth_headers(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}
    for bad in ["", " padded", "padded ", "café", "line\nbreak"]:
        with pytest.raises(ValueError):
            auth_headers(bad)


@settings(max_examples=500, deadline=None)
@given(
    strategies.database,
    strategies.docid,
    strategies.attachment,
    strategies.token,
    st.integers(0, 10**12 - 1),
    st.booleans(),
)
def test_the_service_parses_every_link_back_into_the_same_names(
    db, docid, attachment, token, expires, download
):
    names = (db, docid, attachment)
    url = download_url("https://files.example/base/", *names, token, download=download)
    read, query = parsed(url, "/base")
    assert read == names
    assert query[b"token"] == [token.encode()]
    assert (b"download" in query) is download
    if len(token) >= MIN_SIGNING_TOKEN_LENGTH:
        read, query = parsed(signed_url("https://files.example", *names, token, expires, download=download))
        assert read == names
        assert query[b"expires"] == [str(expires).encode()]
        assert signature_matches((token,), *names, expires, query[b"sig"][0])


@pytest_twisted.ensureDeferred
async def test_python_links_to_awkward_names_download_byte_exact(service, db, awkward_files):
    for stored in awkward_files:
        names = (db, stored.docid, stored.attachment)
        by_query = await fetch(download_url(service.base_url, *names, TOKEN))
        assert (by_query.status, by_query.body) == (200, stored.content), names
        bare = download_url(service.base_url, *names)
        assert (await fetch(bare)).status == 403
        by_header = await fetch(bare, headers=auth_headers(TOKEN))
        assert (by_header.status, by_header.body) == (200, stored.content), names
        signed = await fetch(signed_url(service.base_url, *names, TOKEN, int(time.time()) + 60))
        assert (signed.status, signed.body) == (200, stored.content), names


def run_sign(token: str, *names: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COUCHTOKEN_SIGN_TOKEN": token, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "couchtoken", "sign", "https://files.example", *names]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)


def test_python_m_couchtoken_sign_uses_the_client():
    result = run_sign(LONG_TOKEN, "db", "user/42", "a+b c é?#.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "https://files.example/db/user%2F42/a%2Bb%20c%20%C3%A9%3F%23.txt?expires="
    )
    short = run_sign("fifteen-chars-x", "db", "d", "f")
    assert short.returncode == 2
    assert "at least 16 characters" in short.stderr and "fifteen-chars-x" not in short.stderr
    refused = run_sign(LONG_TOKEN, "db", "_design/x", "f")
    assert refused.returncode == 2
    assert "not served" in refused.stderr and LONG_TOKEN not in refused.stderr
