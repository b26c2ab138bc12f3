"""Where CouchDB is: the parsing of ``COUCHDB_URL``, one node or a comma-separated cluster.

The CouchDB URL carries admin credentials.  They are split off at parse time
into a ready ``Authorization`` header that never shows in ``repr``, logs or
exception texts.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs

DEFAULT_COUCHDB_URL = "http://localhost:5984"


class ConfigError(ValueError):
    """A setting is unusable; the message never repeats a secret."""


@attrs.frozen(repr=False)
class CouchDBServer:
    """Where CouchDB is, and the credentials to send it (kept out of ``repr``)."""

    base_url: str
    authorization: bytes | None = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def from_url(cls, url: str) -> CouchDBServer:
        """Parse ``http(s)://[user:pass@]host[:port][/prefix]``."""
        try:
            parts = urlsplit(url.strip())
            port = parts.port  # raises ValueError on a bad port
        except ValueError:
            raise ConfigError("the CouchDB URL is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("the CouchDB URL must be http:// or https:// with a host")
        if parts.query or parts.fragment:
            raise ConfigError("the CouchDB URL must not have a query or fragment")
        authorization = None
        if parts.username is not None:
            user = unquote(parts.username)
            password = unquote(parts.password or "")
            pair = f"{user}:{password}".encode()
            authorization = b"Basic " + base64.b64encode(pair)
        host = parts.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = host if port is None else f"{host}:{port}"
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        if not base.isascii():
            raise ConfigError("the CouchDB URL must be ASCII (percent-encode its path)")
        return cls(base_url=base, authorization=authorization)

    def __repr__(self) -> str:
        creds = "<credentials>@" if self.authorization else ""
        scheme, _, rest = self.base_url.partition("://")
        return f"CouchDBServer('{scheme}://{creds}{rest}')"

    __str__ = __repr__


def as_cluster(value: CouchDBServer | CouchDBCluster) -> CouchDBCluster:
    return CouchDBCluster((value,)) if isinstance(value, CouchDBServer) else value


@attrs.frozen(repr=False)
class CouchDBCluster:
    """The nodes of one CouchDB cluster, in order of preference (often just one)."""

    nodes: tuple[CouchDBServer, ...]

    @classmethod
    def from_urls(cls, urls: str) -> CouchDBCluster:
        """``http://a:p@n1:5984,http://a:p@n2:5984``: each node with its own credentials."""
        parts = [part.strip() for part in urls.split(",")]
        if not all(parts):
            raise ConfigError("the CouchDB URL list has an empty item")
        nodes = tuple(CouchDBServer.from_url(part) for part in parts)
        if len({node.base_url for node in nodes}) != len(nodes):
            raise ConfigError("the CouchDB URL list names a node twice")
        return cls(nodes)

    def __repr__(self) -> str:
        return ", ".join(repr(node) for node in self.nodes)

    __str__ = __repr__
