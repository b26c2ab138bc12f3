"""Expiring signed links: ``?expires=<unix seconds>&sig=<hex>`` instead of ``?token=``.

``sig`` is HMAC-SHA256 keyed with the document's token (UTF-8) over
``<db>\\n<docid>\\n<attachment>\\n<expires>`` (names decoded, UTF-8).  The
token itself never appears in the link, and changing the document's token
revokes every link signed with it.

Whoever holds a signed link can test guesses of the token offline, as fast as
they can compute HMACs, with no throttle to stop them.  So only tokens of at
least ``MIN_SIGNING_TOKEN_LENGTH`` characters sign links: a link made with a
shorter one is refused, whatever the service's guess throttling.
(``secrets.token_urlsafe(16)``, 128 random bits, gives 22 characters.)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from urllib.parse import urlencode

from couchtoken.access.names import AttachmentPath, attachment_path

DEFAULT_MAX_LIFETIME = 7 * 24 * 3600
# Links are signed only with tokens of at least this many characters (guessing a short key offline is
# cheap). couchtoken.client refuses to sign with shorter ones.
MIN_SIGNING_TOKEN_LENGTH = 16


class Signature(enum.Enum):
    """What a link's signature turns out to be, checked against a document's tokens."""

    VALID = "valid"
    SHORT_TOKEN = "made with a token too short to sign links"
    INVALID = "invalid"


def signature(token: str, db: str, docid: str, attachment: str, expires: int) -> str:
    """The hex HMAC-SHA256 that signs a link to one attachment until ``expires``."""
    message = f"{db}\n{docid}\n{attachment}\n{expires}".encode()
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def check_signature(
    tokens: tuple[str, ...], db: str, docid: str, attachment: str, expires: int, sig: bytes
) -> Signature:
    """Whether ``sig`` was made with one of ``tokens`` long enough to sign (each compared in constant time).

    ``SHORT_TOKEN`` only when the signature matches a short token, so it tells
    nothing to anyone who does not know that token already.
    """
    long_match = short_match = False
    for token in tokens:
        expected = signature(token, db, docid, attachment, expires).encode("ascii")
        matched = hmac.compare_digest(expected, sig.lower())
        if len(token) >= MIN_SIGNING_TOKEN_LENGTH:
            long_match |= matched
        else:
            short_match |= matched
    if long_match:
        return Signature.VALID
    return Signature.SHORT_TOKEN if short_match else Signature.INVALID


def signature_matches(
    tokens: tuple[str, ...], db: str, docid: str, attachment: str, expires: int, sig: bytes
) -> bool:
    """Whether ``sig`` was made with one of ``tokens`` that is long enough to sign links."""
    return check_signature(tokens, db, docid, attachment, expires, sig) is Signature.VALID


def sign_url(base_url: str, db: str, docid: str, attachment: str, token: str, expires: int) -> str:
    """A link to ``attachment`` valid until ``expires`` (unix seconds), without the token in it.

    No checks: ``couchtoken.client.signed_url`` is the public way, which refuses what the service would.
    """
    path = attachment_path(AttachmentPath(db=db, docid=docid, attachment=attachment))
    query = urlencode({"expires": expires, "sig": signature(token, db, docid, attachment, expires)})
    return f"{base_url.rstrip('/')}{path}?{query}"
