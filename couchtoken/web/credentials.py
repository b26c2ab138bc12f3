"""What a request offers to open a document: a token (query or header) or a signed link."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.web.iweb import IRequest

from couchtoken.access.documents import DocumentSummary
from couchtoken.access.links import Signature, check_signature
from couchtoken.access.names import AttachmentPath
from couchtoken.web.answers import FORBIDDEN_REASON, HTTPAnswer, forbidden
from couchtoken.web.query import query_args

SHORT_TOKEN_REASON = "token too short for signed links"


@attrs.frozen
class Credential:
    """``test`` says whether it opens a document (or raises the answer); ``refusal`` says why not."""

    test: Callable[[DocumentSummary], bool]
    refusal: str


def single_arg(request: IRequest, name: bytes) -> bytes | None:
    """A query value given at most once (twice is a 400)."""
    values = query_args(request).get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HTTPAnswer(400, "bad_request", f"'{name.decode()}' must be given once")
    return values[0]


def offered_token(request: IRequest) -> bytes | None:
    """The token from ``?token=``, ``Authorization: Bearer`` or ``X-Download-Token``.

    Headers keep tokens out of URLs, browser history and Referer.  Different
    tokens in different places are refused rather than guessed between.
    """
    offered = set()
    query = single_arg(request, b"token")
    if query:
        offered.add(query)
    for value in request.requestHeaders.getRawHeaders(b"authorization", []):
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            offered.add(credentials.strip())
    for value in request.requestHeaders.getRawHeaders(b"x-download-token", []):
        if value.strip():
            offered.add(value.strip())
    if len(offered) > 1:
        raise HTTPAnswer(400, "bad_request", "different tokens were given")
    return offered.pop() if offered else None


def read_credential(
    request: IRequest, target: AttachmentPath, clock: Any, max_link_lifetime: float
) -> Credential:
    """What the request offers, as a test of a document summary (403 at once if nothing)."""
    offered = offered_token(request)
    sig = single_arg(request, b"sig")
    if sig is None:
        if not offered:
            raise forbidden(guess=True)
        return Credential(lambda summary: summary.accepts(offered), FORBIDDEN_REASON)
    if offered:
        raise HTTPAnswer(400, "bad_request", "give a token or a signature, not both")
    raw_expires = single_arg(request, b"expires") or b""
    if not raw_expires.isdigit() or len(raw_expires) > 12:
        raise HTTPAnswer(400, "bad_request", "'expires' must be unix seconds")
    expires = int(raw_expires)
    now = clock.seconds()
    if expires <= now:
        raise forbidden("expired")
    if expires > now + max_link_lifetime:
        raise forbidden("expires too far ahead")

    def signed(summary: DocumentSummary) -> bool:
        verdict = check_signature(summary.tokens, target.db, target.docid, target.attachment, expires, sig)
        if verdict is Signature.SHORT_TOKEN:
            # Signed with the document's token (so no guess), but one that can be guessed offline.
            raise forbidden(SHORT_TOKEN_REASON)
        return verdict is Signature.VALID

    return Credential(signed, "bad signature")
