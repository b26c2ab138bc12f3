"""Links as good as presigned URLs: header tokens, Content-Disposition, sandboxing, an allowlist."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
import time

import pytest
import pytest_twisted

from couchtoken.access.links import sign_url, signature
from couchtoken.dev.pouchdb import ROOT
from tests.http import fetch, service_url

TOKEN = "link-token-0123456789"


@pytest.fixture
def files(admin, db):
    admin.put(db, "doc", {"download_token": TOKEN})
    for name, content_type in (
        ("note.txt", "text/plain"),
        ("page.html", "text/html; charset=utf-8"),
        ("logo.svg", "image/svg+xml"),
        ("report.pdf", "application/pdf"),
        ("notes.md", "text/markdown"),
        ('dir/Grüße "quoted"; a b.txt', "text/plain"),
    ):
        admin.put_attachment(db, "doc", name, b"content of " + name.encode(), content_type)
    return "doc"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "headers,status",
    [
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
        ({"Authorization": f"bearer   {TOKEN}  "}, 200),
        ({"X-Download-Token": TOKEN}, 200),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"X-Download-Token": "wrong"}, 403),
        ({"Authorization": "Basic bGluay10b2tlbjo="}, 403),
        ({"Authorization": "Bearer "}, 403),
    ],
)
async def test_tokens_in_headers(service, db, files, headers, status):
    reply = await fetch(service.url(db, files, "note.txt"), headers=headers)
    assert reply.status == status


@pytest_twisted.ensureDeferred
async def test_different_tokens_in_different_places_are_refused(service, db, files):
    reply = await fetch(service.url(db, files, "note.txt", TOKEN), headers={"X-Download-Token": "other"})
    assert reply.status == 400
    same = await fetch(service.url(db, files, "note.txt", TOKEN), headers={"X-Download-Token": TOKEN})
    assert same.status == 200


@pytest_twisted.ensureDeferred
async def test_preflight_allows_the_token_headers(service, db, files):
    reply = await fetch(service.url(db, files, "note.txt"), "OPTIONS")
    allowed = {h.strip().lower() for h in reply.header("access-control-allow-headers").split(",")}
    assert {"authorization", "x-download-token", "range", "if-none-match"} <= allowed


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "query,kind",
    [
        ({}, "inline"),
        ({"download": ""}, "attachment"),
        ({"download": "1"}, "attachment"),
        ({"download": "0"}, "inline"),
    ],
)
async def test_content_disposition(service, db, files, query, kind):
    reply = await fetch(service.url(db, files, "note.txt", TOKEN, **query))
    assert reply.header("content-disposition") == f"{kind}; filename=\"note.txt\"; filename*=UTF-8''note.txt"
    assert "content-disposition" in reply.header("access-control-expose-headers").lower()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("suffix", ["&download", "&download&x=1", ";download"])
async def test_a_bare_download_key_asks_for_a_download(service, db, files, suffix):
    # Twisted's request.args drops keys without "="; the README promises ?download.
    reply = await fetch(service.url(db, files, "note.txt", TOKEN) + suffix)
    assert reply.status == 200
    assert reply.header("content-disposition").startswith("attachment;")


@pytest_twisted.ensureDeferred
async def test_unicode_quotes_spaces_and_semicolons_in_the_filename(service, db, files):
    name = 'dir/Grüße "quoted"; a b.txt'
    reply = await fetch(service.url(db, files, name, TOKEN, download="1"))
    assert reply.status == 200
    assert reply.header("content-disposition") == (
        'attachment; filename="Gr__e _quoted_; a b.txt"; '
        "filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%22quoted%22%3B%20a%20b.txt"
    )


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "content_type,served,sandboxed,kind",
    [
        ("text/html; charset=utf-8", "text/html; charset=utf-8", True, "inline"),
        ("image/svg+xml", "image/svg+xml", True, "inline"),
        ("text/plain", "text/plain", False, "inline"),
        ("application/pdf", "application/pdf", False, "inline"),
        ("image/png", "image/png", False, "inline"),
        ("audio/wav", "audio/wav", False, "inline"),
        ("video/mp4", "video/mp4", False, "inline"),
        ("text/csv; header=present", "text/csv; header=present", False, "inline"),
        # Not on the passive list: sandboxed, whatever the type.
        ("text/xsl", "text/xsl", True, "inline"),
        ("TEXT/HTML", "TEXT/HTML", True, "inline"),
        ("application/json", "application/json", True, "inline"),
        ("text/markdown", "text/markdown", True, "inline"),
        ("application/x-unheard-of", "application/x-unheard-of", True, "inline"),
        # Not one well-formed media type: an opaque download.
        ("text/plain,text/html", "application/octet-stream", True, "attachment"),
        ("image/png, text/html", "application/octet-stream", True, "attachment"),
        ('text/plain; a="x,text/html"', "application/octet-stream", True, "attachment"),
        ("text/plain; charset", "application/octet-stream", True, "attachment"),
        ("text/plain text/html", "application/octet-stream", True, "attachment"),
        ("text", "application/octet-stream", True, "attachment"),
        ("application/octet-stream", "application/octet-stream", True, "attachment"),
    ],
)
async def test_only_passive_types_escape_the_sandbox(
    service, admin, db, content_type, served, sandboxed, kind
):
    admin.put(db, "doc", {"download_token": TOKEN})
    admin.put_attachment(db, "doc", "file", b"<script>alert(1)</script>", content_type)
    for method in ("GET", "HEAD"):
        reply = await fetch(service.url(db, "doc", "file", TOKEN), method)
        assert reply.status == 200
        assert reply.header("content-type") == served
        assert (reply.header("content-security-policy") == "sandbox") is sandboxed
        assert reply.header("content-disposition").startswith(kind + ";")
        assert reply.header("x-content-type-options") == "nosniff"


@pytest_twisted.ensureDeferred
async def test_sandbox_and_forced_download_types_are_configurable(start_service, db, files):
    service = await start_service(sandbox_types=("application/pdf",), force_download_types=("text/*",))
    pdf = await fetch(service.url(db, files, "report.pdf", TOKEN))
    assert pdf.header("content-security-policy") == "sandbox"
    assert pdf.header("content-disposition").startswith("inline;")
    for name in ("note.txt", "page.html"):
        text = await fetch(service.url(db, files, name, TOKEN))
        assert text.header("content-disposition").startswith("attachment;")
    assert (
        (await fetch(service.url(db, files, "logo.svg", TOKEN)))
        .header("content-disposition")
        .startswith("inline;")
    )


@pytest_twisted.ensureDeferred
async def test_a_database_allowlist(start_service, admin, db, files):
    service = await start_service(databases=("userdb-*", db))
    assert (await fetch(service.url(db, files, "note.txt", TOKEN))).status == 200
    other = f"other-{db}"
    admin.create_db(other)
    try:
        admin.put(other, "doc", {"download_token": TOKEN})
        admin.put_attachment(other, "doc", "note.txt", b"not served here")
        reply = await fetch(service_url(service.base_url, other, "doc", "note.txt", TOKEN))
        assert reply.status == 403
        # Nothing of it reached CouchDB (the allowed database's feed may connect meanwhile).
        assert not [t for t in service.couchdb_targets() if other in t]
    finally:
        admin.delete_db(other)


# -- Expiring signed links -------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_the_documented_message():
    expected = hmac.new(
        b"k\xc3\xa9y", "db\nd/1\na b/\xe9.txt\n1700000000".encode(), hashlib.sha256
    ).hexdigest()
    assert signature("kéy", "db", "d/1", "a b/é.txt", 1700000000) == expected


@pytest_twisted.ensureDeferred
async def test_a_signed_link_opens_until_it_expires(service, db, files):
    expires = int(time.time()) + 60
    url = sign_url(service.base_url, db, files, "note.txt", TOKEN, expires)
    assert "token" not in url and TOKEN not in url
    reply = await fetch(url)
    assert (reply.status, reply.body) == (200, b"content of note.txt")
    past = sign_url(service.base_url, db, files, "note.txt", TOKEN, int(time.time()) - 1)
    expired = await fetch(past)
    assert (expired.status, expired.json()["reason"]) == (403, "expired")
    far = sign_url(service.base_url, db, files, "note.txt", TOKEN, int(time.time()) + 8 * 24 * 3600)
    assert (await fetch(far)).status == 403


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", ["wrong-key", "other-file", "tampered-expiry", "missing-doc"])
async def test_bad_signatures_are_refused(service, db, files, how):
    expires = int(time.time()) + 60
    key, name, doc = TOKEN, "note.txt", files
    if how == "wrong-key":
        key = "guess"
    url = sign_url(service.base_url, db, doc, name, key, expires)
    if how == "other-file":
        url = url.replace("note.txt", "report.pdf")
    if how == "tampered-expiry":
        url = url.replace(f"expires={expires}", f"expires={expires + 1}")
    if how == "missing-doc":
        url = sign_url(service.base_url, db, "nodoc", name, key, expires)
    reply = await fetch(url)
    assert (reply.status, reply.json()["reason"]) == (403, "bad signature")


@pytest_twisted.ensureDeferred
async def test_changing_the_token_revokes_signed_links(service, admin, db, files):
    url = sign_url(service.base_url, db, files, "note.txt", TOKEN, int(time.time()) + 60)
    admin.put(db, files, {"download_token": [TOKEN, "next"]})  # rotation: still valid
    assert (await fetch(url)).status == 200
    admin.put(db, files, {"download_token": "next"})
    started = time.monotonic()
    while (await fetch(url)).status != 403:
        assert time.monotonic() - started < 1.0, "the signed link still works after 1 s"


@pytest_twisted.ensureDeferred
async def test_a_token_and_a_signature_together_are_refused(service, db, files):
    url = sign_url(service.base_url, db, files, "note.txt", TOKEN, int(time.time()) + 60)
    assert (await fetch(url + f"&token={TOKEN}")).status == 400
    assert (await fetch(service.url(db, files, "note.txt", sig="ab", expires="soon"))).status == 400


@pytest_twisted.ensureDeferred
async def test_a_link_signed_with_a_short_token_is_refused_with_its_reason(start_service, admin, db):
    short, strong = "fifteen-chars-x", "sixteen-chars-xy"
    admin.put(db, "weak", {"download_token": short})
    admin.put_attachment(db, "weak", "f.txt", b"weak", "text/plain")
    admin.put(db, "both", {"download_token": [short, strong]})
    admin.put_attachment(db, "both", "f.txt", b"both", "text/plain")
    service = await start_service(max_failures=1)  # the refusal is no guess: it needs the token
    expires = int(time.time()) + 60
    for _ in range(2):
        reply = await fetch(sign_url(service.base_url, db, "weak", "f.txt", short, expires))
        assert (reply.status, reply.json()["reason"]) == (403, "token too short for signed links")
        reply = await fetch(sign_url(service.base_url, db, "both", "f.txt", short, expires))
        assert (reply.status, reply.json()["reason"]) == (403, "token too short for signed links")
    reply = await fetch(sign_url(service.base_url, db, "both", "f.txt", strong, expires))
    assert (reply.status, reply.body) == (200, b"both")
    assert (await fetch(service.url(db, "weak", "f.txt", short))).status == 200  # ?token= still works
    # Without the token, a short one is not revealed: a bad signature is just that.
    guess = await fetch(sign_url(service.base_url, db, "weak", "f.txt", "x" * 20, expires))
    assert (guess.status, guess.json()["reason"]) == (403, "bad signature")


def _couchtoken(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if token is not None:
        env["COUCHTOKEN_SIGN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "couchtoken", *args], capture_output=True, text=True, env=env, timeout=30
    )


def test_python_m_couchtoken_token_prints_a_strong_token():
    tokens = {_couchtoken("token").stdout.strip() for _ in range(3)}
    assert len(tokens) == 3
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", token), token
        assert len(base64.urlsafe_b64decode(token + "==")) == 16


def test_python_m_couchtoken_sign_refuses_a_short_token():
    result = _couchtoken("sign", "https://files.example", "db", "d", "f.txt", token="fifteen-chars-x")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "shorter than 16 characters" in result.stderr
    assert "fifteen-chars-x" not in result.stderr


def test_python_m_couchtoken_sign_prints_a_link():
    token = "link-token-of-16+"  # signing needs 16 characters
    env = {**os.environ, "COUCHTOKEN_SIGN_TOKEN": token, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "couchtoken",
            "sign",
            "https://files.example",
            "db",
            "d/1",
            "a b.txt",
            "--expires-in",
            "600",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    link = result.stdout.strip()
    assert link.startswith("https://files.example/db/d%2F1/a%20b.txt?expires=")
    expires = int(link.split("expires=")[1].split("&")[0])
    assert abs(expires - (time.time() + 600)) < 30
    assert link.endswith("&sig=" + signature(token, "db", "d/1", "a b.txt", expires))
    assert token not in link
