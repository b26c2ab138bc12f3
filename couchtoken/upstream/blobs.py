"""Small attachment bodies kept in memory, keyed by their digest.

An attachment's bytes never change for a given digest, so once a download
has passed the token check, a small body can be answered from memory with
no CouchDB request at all.  The key holds the digest the (feed-fresh)
document cache reports, so new content is a new key and old bytes can never
be served for it.  Bodies are stored only as they stream past to the first
client (never a second read from CouchDB), identity-encoded, and only when
complete.  The cache is an LRU bounded in bytes.  A database's bodies are
dropped whenever its feed has a gap (a deleted database's feed always has
one), so they never outlive the database.
"""

from __future__ import annotations

from cachetools import LRUCache

BlobKey = tuple[str, str, str, str]  # database, document id, attachment name, digest


class BlobCache:
    """A byte-bounded LRU of attachment bodies (``max_bytes`` 0 turns it off)."""

    def __init__(self, max_bytes: int, max_item: int) -> None:
        self._bodies: LRUCache[BlobKey, bytes] | None = None
        if max_bytes > 0:
            self._bodies = LRUCache(maxsize=max_bytes, getsizeof=len)
        self.max_item = min(max_item, max_bytes)
        self.hits = 0
        self.misses = 0

    @property
    def bytes_held(self) -> int:
        return 0 if self._bodies is None else int(self._bodies.currsize)

    def wants(self, length: int | None) -> bool:
        """Whether a body of ``length`` bytes would be kept."""
        return self._bodies is not None and length is not None and 0 < length <= self.max_item

    def get(self, key: BlobKey) -> bytes | None:
        if self._bodies is None:
            return None
        body = self._bodies.get(key)
        if body is None:
            self.misses += 1
        else:
            self.hits += 1
        return body

    def put(self, key: BlobKey, body: bytes) -> None:
        if self.wants(len(body)):
            self._bodies[key] = body  # type: ignore[index]

    def drop_database(self, db: str) -> None:
        """Forget every body of ``db`` (its feed had a gap: the database may be gone)."""
        self.drop_databases({db})

    def drop_databases(self, dbs: set[str]) -> None:
        """Forget every body of these databases (one pass over the cache)."""
        if self._bodies is None or not dbs:
            return
        for key in [k for k in self._bodies.keys() if k[0] in dbs]:
            self._bodies.pop(key, None)
