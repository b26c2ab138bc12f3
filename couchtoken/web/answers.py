"""Error answers: a status and a small JSON body, raised from anywhere in a request."""

from __future__ import annotations

import json
from http import HTTPStatus

from twisted.web.iweb import IRequest

EXPOSED_HEADERS = b"Content-Length, Content-Range, Content-Encoding, Content-Disposition, ETag, Accept-Ranges"

COMMON_HEADERS = (
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", EXPOSED_HEADERS),
    (b"x-content-type-options", b"nosniff"),
)
# Headers a success may have set before the failure was known; an error answer drops them.
SUCCESS_HEADERS = (
    b"content-disposition",
    b"content-security-policy",
    b"etag",
    b"accept-ranges",
    b"vary",
    b"content-range",
    b"content-encoding",
    b"content-length",
    b"content-type",
    b"cache-control",
    b"retry-after",
)
FORBIDDEN_REASON = "invalid or missing download token"


class HTTPAnswer(Exception):
    """A finished answer (status and JSON body) raised from deep in a request."""

    def __init__(
        self, status: int, error: str, reason: str, *, guess: bool = False, **headers: bytes
    ) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.guess = guess  # a failed token check: counts towards guess throttling
        self.body = {"error": error, "reason": reason}
        self.headers = headers


def forbidden(reason: str = FORBIDDEN_REASON, *, guess: bool = False) -> HTTPAnswer:
    """The one 403 for every refusal that must not tell an outsider anything."""
    return HTTPAnswer(403, "forbidden", reason, guess=guess)


def set_common_headers(request: IRequest) -> None:
    for name, value in COMMON_HEADERS:
        request.setHeader(name, value)


def write_answer(request: IRequest, answer: HTTPAnswer) -> bytes:
    """Set the answer's status and headers on ``request``; return its body."""
    body = json.dumps(answer.body, separators=(",", ":")).encode("ascii")
    for name in SUCCESS_HEADERS:
        request.responseHeaders.removeHeader(name)
    # Twisted knows no reason phrase for some codes (429 would read "Unknown Status").
    request.setResponseCode(answer.status, HTTPStatus(answer.status).phrase.encode("ascii"))
    set_common_headers(request)
    for name, value in answer.headers.items():
        request.setHeader(name.replace("_", "-"), value)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
