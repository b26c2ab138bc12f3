"""Expiring signed links: ``?expires=<unix seconds>&sig=<hex>`` instead of ``?token=``.

``sig`` is HMAC-SHA256 keyed with the document's token (UTF-8) over
``<db>\\n<docid>\\n<attachment>\\n<expires>`` (names decoded, UTF-8).  The
token itself never appears in the link, and changing the document's token
revokes every link signed with it.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode

from couchtoken.access.names import AttachmentPath, attachment_path

DEFAULT_MAX_LIFETIME = 7 * 24 * 3600
# Links are signed only with tokens of at least this many characters (guessing a short key offline is
# cheap). couchtoken.client refuses to sign with shorter ones.
MIN_SIGNING_TOKEN_LENGTH = 16


def signature(token: str, db: str, docid: str, attachment: str, expires: int) -> str:
    """The hex HMAC-SHA256 that signs a link to one attachment until ``expires``."""
    message = f"{db}\n{docid}\n{attachment}\n{expires}".encode()
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_matches(
    tokens: tuple[str, ...], db: str, docid: str, attachment: str, expires: int, sig: bytes
) -> bool:
    """Whether ``sig`` was made with one of ``tokens`` (each compared in constant time)."""
    matched = False
    for token in tokens:
        expected = signature(token, db, docid, attachment, expires).encode("ascii")
        matched |= hmac.compare_digest(expected, sig.lower())
    return matched


def sign_url(base_url: str, db: str, docid: str, attachment: str, token: str, expires: int) -> str:
    """A link to ``attachment`` valid until ``expires`` (unix seconds), without the token in it.

    No checks: ``couchtoken.client.signed_url`` is the public way, which refuses what the service would.
    """
    path = attachment_path(AttachmentPath(db=db, docid=docid, attachment=attachment))
    query = urlencode({"expires": expires, "sig": signature(token, db, docid, attachment, expires)})
    return f"{base_url.rstrip('/')}{path}?{query}"
