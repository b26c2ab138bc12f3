"""Break a response off so that the client sees it incomplete, on HTTP/1.1 and HTTP/2 alike."""

from __future__ import annotations

from twisted.web.iweb import IRequest


def abort_response(request: IRequest) -> None:
    """HTTP/1.1: abort the connection.  HTTP/2: reset the request's stream (RST_STREAM) only.

    An HTTP/2 request has no transport of its own; its channel is the stream.
    """
    transport = getattr(request, "transport", None)
    if transport is not None:
        transport.abortConnection()
        return
    channel = getattr(request, "channel", None)
    if channel is not None and hasattr(channel, "abortConnection"):
        channel.abortConnection()
