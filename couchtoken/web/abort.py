"""Break a response off so that the client sees it incomplete, on HTTP/1.1 and HTTP/2 alike."""

from __future__ import annotations

from typing import NoReturn

from twisted.internet.defer import CancelledError
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


async def break_off(request: IRequest) -> NoReturn:
    """Break the response off, then end the route once the connection (or stream) is gone.

    Over HTTP/1.1 the connection is lost a moment later, when Klein cancels
    the route; over HTTP/2 the stream is reset at once, while the route is
    still running, so there would be nothing left to cancel: waiting on
    ``notifyFinish`` (asked before aborting) covers both.
    """
    gone = request.notifyFinish()
    abort_response(request)
    try:
        await gone
    except Exception:  # the connection was lost, or Klein cancelled the wait: the same end
        pass
    raise CancelledError()
