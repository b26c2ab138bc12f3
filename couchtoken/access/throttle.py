"""Guess throttling: too many failed token checks from one client address answer 429.

Each client address may fail ``max_failures`` checks in a window of
``window`` seconds (from its first failure); past that, every request from it
gets 429 with ``Retry-After`` until the window ends, decided before any
token comparison or CouchDB request.  Behind a reverse proxy listed in
``trusted_proxies``, the client is the right-most address of
``X-Forwarded-For`` that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from typing import Any

from cachetools import TTLCache
from twisted.web.iweb import IRequest


class GuessThrottle:
    """Counts failed checks per client address in fixed windows on the injected clock."""

    def __init__(
        self,
        clock: Any,
        max_failures: int,
        *,
        window: float = 60.0,
        trusted_proxies: Iterable[str] = (),
        max_clients: int = 100_000,
    ) -> None:
        self._clock = clock
        self._max_failures = max_failures
        self._window = window
        self._trusted = [ipaddress.ip_network(p.strip(), strict=False) for p in trusted_proxies if p.strip()]
        # address -> [window start, failures]; entries vanish when their window is over.
        self._failures: TTLCache[str, list[float]] = TTLCache(
            maxsize=max_clients, ttl=window, timer=clock.seconds
        )

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def client(self, request: IRequest) -> str:
        """The address the request comes from, looking through trusted reverse proxies."""
        peer = getattr(request.getClientAddress(), "host", "") or ""
        if not self._trusted or not self._is_trusted(peer):
            return peer
        forwarded: list[str] = []
        for header in request.requestHeaders.getRawHeaders(b"x-forwarded-for", []):
            forwarded += [part.strip() for part in header.decode("latin-1").split(",") if part.strip()]
        for address in reversed(forwarded):
            if not self._is_trusted(address):
                return address
        return peer

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it is not throttled."""
        if self._max_failures <= 0:
            return None
        entry = self._failures.get(client)
        if entry is None or entry[1] < self._max_failures:
            return None
        return max(1, math.ceil(entry[0] + self._window - self._clock.seconds()))

    def failed(self, client: str) -> None:
        """Record a failed token check from ``client``."""
        if self._max_failures <= 0:
            return
        entry = self._failures.get(client)
        if entry is None:
            self._failures[client] = [self._clock.seconds(), 1]
        else:
            entry[1] += 1
