"""How large a request's head may be, over HTTP/1.1 and HTTP/2: 414 past the URI limit, 431 past the rest.

The HTTP/1.1 channel counts the request line and header lines as they
arrive (``couchtoken.web.channel``); over HTTP/2 a stream's header block
comes whole, and ``refusal`` judges it once decoded.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
REASONS = {
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
}


def refusal(request: IRequest) -> int | None:
    """414 or 431 when the request's head is over the limits, else None."""
    if len(request.uri or b"") > MAX_REQUEST_LINE:
        return 414
    size = len(request.method or b"") + len(request.uri or b"")
    for name, values in request.requestHeaders.getAllRawHeaders():
        size += sum(len(name) + len(value) for value in values)
    return 431 if size > MAX_HEADER_BYTES else None
