"""A test HTTP client that shows bytes exactly as the service sent them."""

from __future__ import annotations

import socket
from urllib.parse import quote, urlencode

import attrs
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

_pool = HTTPConnectionPool(reactor, persistent=False)
_agent = Agent(reactor, pool=_pool)


def service_url(
    base: str, db: str, docid: str, attachment: str, token: str | None = None, **query: str
) -> str:
    """``/<db>/<docid>/<attachment>`` with the db and doc id as one segment each."""
    path = "/".join(
        [quote(db, safe=""), quote(docid, safe="")] + [quote(part, safe="") for part in attachment.split("/")]
    )
    params = dict(query)
    if token is not None:
        params = {"token": token, **params}
    suffix = "?" + urlencode(params) if params else ""
    return f"{base}/{path}{suffix}"


@attrs.frozen
class Reply:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode("latin-1") if values else None

    def json(self) -> object:
        import json

        return json.loads(self.body)


async def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    """One request, no decoding, no redirects; raises if the body breaks off."""
    raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
    response = await _agent.request(method.encode(), url.encode("ascii"), raw)
    body = await treq.content(response)
    headers = response.headers.copy()
    # Twisted's client moves Content-Length out of the headers into .length.
    if response.length is not UNKNOWN_LENGTH and method != "HEAD":
        headers.setRawHeaders(b"content-length", [b"%d" % response.length])
    return Reply(response.code, headers, body)


def raw_exchange(port: int, raw: bytes, timeout: float = 15) -> bytes:
    """Send bytes exactly as given (no client-side normalisation); read until the server closes.

    Blocking: call it from a thread (``threads.deferToThread``) while the reactor runs.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def start_download(
    port: int, path: str, *, rcvbuf: int = 65536, connection: str | None = None
) -> socket.socket:
    """``GET path`` on a raw socket with a small receive buffer, nothing read yet: the download stays
    in flight, held back by TCP, until the test reads or closes the socket.

    Blocking: call it from a thread (``threads.deferToThread``) while the reactor runs.
    """
    sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window follows it
    sock.connect(("127.0.0.1", port))
    close = f"Connection: {connection}\r\n" if connection else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{close}\r\n".encode())
    return sock


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head off ``sock``: (the head, the body bytes read with it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before the end of the head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return head, body


def refuses_connections(port: int) -> bool:
    """Whether the port refuses new connections (a reset means it closed while we connected)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False
