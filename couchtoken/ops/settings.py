"""Settings of a running service."""

from __future__ import annotations

import attrs

from couchtoken.upstream.server import ConfigError, CouchDBCluster, as_cluster

DEFAULT_TOKEN_FIELD = "download_token"


def parse_token_field(value: str) -> tuple[str, ...]:
    """``data.token`` -> ``("data", "token")``; empty parts are refused."""
    path = tuple(value.split("."))
    if not value or any(not part for part in path):
        raise ConfigError(f"the token field {value!r} is not a dotted field name")
    return path


@attrs.frozen
class Settings:
    """Everything the download service needs to run."""

    couchdb: CouchDBCluster = attrs.field(converter=as_cluster)  # a CouchDBServer is one node
    token_field: tuple[str, ...] = (DEFAULT_TOKEN_FIELD,)
    connect_timeout: float = 5.0
    response_timeout: float = 30.0
    max_connections: int = 32
    cache_size: int = 10_000
    cache_bytes: int = 64 * 1024 * 1024
    cache_ttl: float = 600.0
    max_feeds: int = 100
    feed_heartbeat: float = 1.0
    max_downloads: int = 1000
    idle_timeout: float = 60.0
    drain_timeout: float = 30.0
    access_log_format: str = "combined"
    metrics_port: str | None = None
    public_metrics: bool = False
    blob_cache_bytes: int = 64 * 1024 * 1024
    blob_cache_max_item: int = 256 * 1024
    disk_cache_dir: str | None = None
    disk_cache_bytes: int = 10 * 1024**3
    disk_cache_max_item: int = 1024**3
    sandbox_types: tuple[str, ...] = ()
    force_download_types: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    max_link_lifetime: float = 7 * 24 * 3600.0
    max_failures: int = 30
    max_client_failures: int = 300
    trusted_proxies: tuple[str, ...] = ()
    http2: bool = True

    def describe(self) -> str:
        """One line for the start-up log, credentials masked."""
        return (
            f"couchdb={self.couchdb!r} token_field={'.'.join(self.token_field)} "
            f"connect_timeout={self.connect_timeout}s "
            f"response_timeout={self.response_timeout}s "
            f"max_connections={self.max_connections} "
            f"cache_size={self.cache_size} cache_bytes={self.cache_bytes} cache_ttl={self.cache_ttl}s "
            f"max_feeds={self.max_feeds} feed_heartbeat={self.feed_heartbeat}s "
            f"max_downloads={self.max_downloads} idle_timeout={self.idle_timeout}s "
            f"drain_timeout={self.drain_timeout}s log_format={self.access_log_format} "
            f"metrics_port={self.metrics_port or '-'} "
            f"public_metrics={'on' if self.public_metrics else 'off'} "
            f"blob_cache_bytes={self.blob_cache_bytes} blob_cache_max_item={self.blob_cache_max_item} "
            f"disk_cache_dir={self.disk_cache_dir or '-'} disk_cache_bytes={self.disk_cache_bytes} "
            f"disk_cache_max_item={self.disk_cache_max_item} "
            f"databases={','.join(self.databases) or '*'} http2={'on' if self.http2 else 'off'}"
        )
