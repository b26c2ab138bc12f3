"""How large a request may be, over HTTP/1.1 and HTTP/2: 414 past the URI limit, 431 past the rest of
the head, 413 for any body (no request here takes one).

The HTTP/1.1 channel counts the request line and header lines as they
arrive (``couchtoken.web.channel``); over HTTP/2 a stream's header block
comes whole, and ``refusal`` judges it once decoded.  An HTTP/2 stream
whose body was refused (``couchtoken.web.h2``) is marked ``body_refused``.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.iweb import IRequest

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
REASONS = {
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


def announces_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether an HTTP/2 request's header block announces a body: a content-length above 0.

    (h2 has already refused a content-length that is not digits, and transfer-encoding.)
    """
    return any(name == b"content-length" and int(value) > 0 for name, value in headers)


def refusal(request: IRequest) -> int | None:
    """413 when the request's body was refused, 414 or 431 when its head is over the limits, else None."""
    if getattr(request, "body_refused", False):
        return 413
    if len(request.uri or b"") > MAX_REQUEST_LINE:
        return 414
    size = len(request.method or b"") + len(request.uri or b"")
    for name, values in request.requestHeaders.getAllRawHeaders():
        size += sum(len(name) + len(value) for value in values)
    return 431 if size > MAX_HEADER_BYTES else None
