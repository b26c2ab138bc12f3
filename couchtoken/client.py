"""Making links from Python: the public face of the service's own path and signing code.

The same four helpers as ``clients/js/couchtoken.js``, giving the same URLs.
Nothing here is a second implementation: paths are encoded by
``couchtoken.access.names`` and read back with the service's own parser
(so names the service would refuse raise ``ValueError`` here), and links are
signed by ``couchtoken.access.links``.  Names are used exactly as given (no
Unicode normalisation).  Errors never quote the token.
"""

from __future__ import annotations

import math
import re
import secrets
from datetime import datetime

from couchtoken.access.links import MIN_SIGNING_TOKEN_LENGTH, sign_url
from couchtoken.access.names import AttachmentPath, attachment_path, encode_segment, parse_download_path

__all__ = [
    "MIN_SIGNING_TOKEN_LENGTH",
    "auth_headers",
    "download_path",
    "download_url",
    "new_token",
    "signed_url",
]

MAX_EXPIRES = 10**12 - 1  # the service reads at most 12 digits
# What survives as a header value and the service's strip(): visible ASCII, inner spaces allowed.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?\Z")


def download_path(db: str, docid: str, attachment: str) -> str:
    """``/<db>/<docid>/<attachment>``, encoded the way the service parses it; ValueError if it would refuse.

    The doc id's ``/`` becomes ``%2F``; the attachment's ``/`` stays (it nests); every other byte but
    ``A-Z a-z 0-9 - . _ ~`` is percent-encoded as UTF-8.
    """
    for name in (db, docid, attachment):
        if not isinstance(name, str):
            raise TypeError("db, docid and attachment must be str")
    try:
        path = attachment_path(AttachmentPath(db=db, docid=docid, attachment=attachment))
    except UnicodeEncodeError:
        raise ValueError("a name is not valid Unicode (lone surrogate)") from None
    parse_download_path(path.encode("ascii"))  # BadPath, a ValueError, says why it would be refused
    return path


def _encoded_token(token: object) -> str:
    """The token as a query value; refuses what no document could hold (not a str, empty, not Unicode)."""
    if not isinstance(token, str):
        raise TypeError("the token must be a str")
    if not token:
        raise ValueError("the token is empty")
    try:
        return encode_segment(token)
    except UnicodeEncodeError:
        raise ValueError("the token is not valid Unicode (lone surrogate)") from None


def download_url(
    base_url: str,
    db: str,
    docid: str,
    attachment: str,
    token: str | None = None,
    *,
    download: bool = False,
) -> str:
    """A link to one attachment with ``?token=`` (or none, for a token sent by ``auth_headers``).

    ``download=True`` asks for ``Content-Disposition: attachment``.
    """
    path = download_path(db, docid, attachment)
    query = []
    if token is not None:
        query.append("token=" + _encoded_token(token))
    if download:
        query.append("download=1")
    return base_url.rstrip("/") + path + ("?" + "&".join(query) if query else "")


def _unix_seconds(expires_at: int | datetime) -> int:
    if isinstance(expires_at, datetime):
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must be an aware datetime (or unix seconds)")
        expires_at = math.floor(expires_at.timestamp())
    elif isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise TypeError("expires_at must be int unix seconds or an aware datetime")
    if not 0 <= expires_at <= MAX_EXPIRES:
        raise ValueError("expires_at is out of range")
    return expires_at


def signed_url(
    base_url: str,
    db: str,
    docid: str,
    attachment: str,
    token: str,
    expires_at: int | datetime,
    *,
    download: bool = False,
) -> str:
    """An expiring link (``?expires=&sig=``) signed with the document's token, which it does not carry.

    Refuses tokens shorter than ``MIN_SIGNING_TOKEN_LENGTH`` characters.  This is what
    ``python -m couchtoken sign`` prints.
    """
    download_path(db, docid, attachment)
    _encoded_token(token)
    if len(token) < MIN_SIGNING_TOKEN_LENGTH:
        raise ValueError(
            f"the token is shorter than {MIN_SIGNING_TOKEN_LENGTH} characters: signing needs a token of "
            f"at least {MIN_SIGNING_TOKEN_LENGTH} characters, or anyone holding a link could guess it "
            "offline (python -m couchtoken token makes a strong one)"
        )
    url = sign_url(base_url, db, docid, attachment, token, _unix_seconds(expires_at))
    return url + "&download=1" if download else url


def new_token() -> str:
    """A fresh download token: 128 random bits, base64url (22 characters)."""
    return secrets.token_urlsafe(16)


def auth_headers(token: str) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``: the token travels in a header, not in the URL.

    Refuses tokens a header cannot carry unchanged (non-ASCII, control characters, surrounding spaces):
    send those with ``download_url``.
    """
    _encoded_token(token)
    if not _HEADER_TOKEN.match(token):
        raise ValueError("this token cannot travel in a header; put it in the URL with download_url")
    return {"Authorization": f"Bearer {token}"}
