"""Guess throttling: too many failed token checks answer 429, per client and document.

A guesser attacks one document, so failures are counted per client *and*
document (database and id): ``max_failures`` in a window of ``window``
seconds, from the first check.  Past it, that client gets 429 for that
document only, so a page full of stale links to many documents still gets
its 403s, and its valid links still work.  A looser ceiling,
``max_client_failures`` per window across all documents, stops one guess
sprayed over many documents; past it the client gets 429 for everything.
A 429 is decided before any token comparison or CouchDB request.

A check counts as a failure from the moment it starts until it passes, so
a burst of concurrent guesses cannot slip past the budget while the first
ones are still waiting for CouchDB.

Behind a reverse proxy listed in ``trusted_proxies``, the client is the
right-most address of ``X-Forwarded-For`` that is not itself a trusted
proxy.  ``unix`` in that list trusts every connection that arrives on a
UNIX socket (whose peers have no address: without it, they all count as
one client).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Hashable, Iterable
from typing import Any

import attrs
from cachetools import TTLCache
from twisted.internet.address import UNIXAddress
from twisted.web.iweb import IRequest

UNIX_PEERS = "unix"


class Throttled(Exception):
    """Too many failed checks: try again in ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


@attrs.define
class _Window:
    ends: float
    used: int = 0  # failures, and checks still under way


class Attempt:
    """A token check under way, counted as a failure until ``passed``."""

    def __init__(self, windows: list[_Window]) -> None:
        self._windows = windows

    def passed(self) -> None:
        """The check passed (or ended without a verdict): give its slots back.  Only the first call counts."""
        for window in self._windows:
            window.used -= 1
        self._windows = []

    def failed(self) -> None:
        """The check failed: its slots stay used until their windows end."""
        self._windows = []


class GuessThrottle:
    """Counts failed checks per (client, document) and per client, in fixed windows on the injected clock."""

    def __init__(
        self,
        clock: Any,
        max_failures: int,
        *,
        max_client_failures: int = 0,
        window: float = 60.0,
        trusted_proxies: Iterable[str] = (),
        max_keys: int = 100_000,
    ) -> None:
        self._clock = clock
        self._max_failures = max_failures
        self._max_client_failures = max_client_failures
        self._window = window
        proxies = [p.strip() for p in trusted_proxies if p.strip()]
        self._trust_unix = UNIX_PEERS in proxies
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in proxies if p != UNIX_PEERS]
        # Entries vanish when their window is over (the TTL runs from the first check).
        self._per_document: TTLCache[Hashable, _Window] = TTLCache(max_keys, window, timer=clock.seconds)
        self._per_client: TTLCache[Hashable, _Window] = TTLCache(max_keys, window, timer=clock.seconds)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def client(self, request: IRequest) -> str:
        """Who the request comes from, looking through trusted reverse proxies."""
        address = request.getClientAddress()
        if isinstance(address, UNIXAddress):
            peer, trusted = UNIX_PEERS, self._trust_unix
        else:
            peer = getattr(address, "host", "") or ""
            trusted = self._is_trusted(peer)
        if not trusted:
            return peer
        forwarded: list[str] = []
        for header in request.requestHeaders.getRawHeaders(b"x-forwarded-for", []):
            forwarded += [part.strip() for part in header.decode("latin-1").split(",") if part.strip()]
        for candidate in reversed(forwarded):
            if not self._is_trusted(candidate):
                return candidate
        return peer

    def start(self, client: str, document: tuple[str, str]) -> Attempt:
        """Count a check of ``document`` by ``client`` as it starts; raises Throttled when over budget."""
        if self._max_failures <= 0:
            return Attempt([])
        budgets = [(self._per_document, (client, *document), self._max_failures)]
        if self._max_client_failures > 0:
            budgets.append((self._per_client, client, self._max_client_failures))
        now = self._clock.seconds()
        windows = [(self._current(table, key, now), limit) for table, key, limit in budgets]
        waits = [window.ends - now for window, limit in windows if window.used >= limit]
        if waits:
            raise Throttled(max(1, math.ceil(max(waits))))
        for window, _ in windows:
            window.used += 1
        return Attempt([window for window, _ in windows])

    def _current(self, table: TTLCache[Hashable, _Window], key: Hashable, now: float) -> _Window:
        window = table.get(key)
        if window is None:
            window = table[key] = _Window(ends=now + self._window)
        return window
