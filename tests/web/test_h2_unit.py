"""``GuardedH2Connection`` in memory, on a ``Clock``: an ``h2`` client on one side, a string transport.

What a real socket would make slow or racy to show: connection-specific
headers never reach an HTTP/2 client (the drain's 503 sets
``Connection: close`` for HTTP/1.1; the h2 library strips it), and the idle
and header timers run on the injected clock.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from couchtoken.web.accesslog import DownloadSite
from couchtoken.web.answers import HTTPAnswer, write_answer
from couchtoken.web.h2 import GuardedH2Connection


class _ShuttingDown(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"connection", b"close")
        request.setHeader(b"keep-alive", b"timeout=5")
        return write_answer(request, HTTPAnswer(503, "unavailable", "shutting down", retry_after=b"5"))


def _connect(
    resource: Resource,
) -> tuple[GuardedH2Connection, StringTransport, h2.connection.H2Connection, Clock]:
    clock = Clock()
    site = DownloadSite(resource, reactor=clock)
    connection = GuardedH2Connection(clock)
    connection.site = connection.factory = site
    connection.requestFactory = site.requestFactory
    connection.timeOut = site.timeOut
    connection.callLater = clock.callLater
    transport = StringTransport()
    connection.makeConnection(transport)
    transport.registerProducer(connection, True)  # as NegotiatingChannel does
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    connection.dataReceived(client.data_to_send())
    return connection, transport, client, clock


def _events(transport: StringTransport, client: h2.connection.H2Connection) -> list[h2.events.Event]:
    events = client.receive_data(transport.value())
    transport.clear()
    return events


def test_connection_specific_headers_never_reach_an_http2_client():
    connection, transport, client, clock = _connect(_ShuttingDown())
    client.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/db/doc/f")],
        end_stream=True,
    )
    connection.dataReceived(client.data_to_send())
    for _ in range(10):
        clock.advance(0)  # Twisted sends one frame per reactor turn
    events = _events(transport, client)
    (response,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    headers = dict(response.headers)
    assert headers[b":status"] == b"503"
    assert headers[b"retry-after"] == b"5"
    assert b"connection" not in headers and b"keep-alive" not in headers
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert b"shutting down" in body
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_the_idle_timer_runs_only_without_streams_and_ignores_pings():
    connection, transport, client, clock = _connect(_ShuttingDown())
    _events(transport, client)
    for _ in range(11):
        clock.advance(5)
        client.ping(b"12345678")
        connection.dataReceived(client.data_to_send())
    assert not transport.disconnecting  # 55 s
    clock.advance(5)
    events = _events(transport, client)
    (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == 0
    assert transport.disconnecting


def test_an_unfinished_header_block_has_ten_seconds():
    connection, transport, client, clock = _connect(_ShuttingDown())
    _events(transport, client)
    client.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", "x"), (":path", "/db/doc/f")],
        end_stream=True,
    )
    block = client.data_to_send()
    connection.dataReceived(block[:-3])  # all but the last bytes of the HEADERS frame
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    events = _events(transport, client)
    (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert transport.disconnecting
