"""Client connections held at once, kept below the process's file descriptor limit.

Every client connection is a file descriptor, and so is every connection to
CouchDB a download needs.  Left alone, a crowd of idle clients takes every
descriptor, and real downloads then fail because no connection to CouchDB can
be opened.  So the public port serves at most ``limit`` connections at once;
past it, a new connection is accepted and closed at once (refused), and the
ones already open go on being served.  The limit leaves room for the
CouchDB connection pool, the feeds, one CouchDB connection per download
(up to ``--max-downloads``) and a margin for everything else.
"""

from __future__ import annotations

import resource

from twisted.logger import Logger

MARGIN = 64  # listening sockets, log files, the reactor, Twisted's EMFILE reserve...
_log = Logger()


def client_connection_limit(
    descriptors: int, *, pool: int, feeds: int, max_downloads: int, margin: int = MARGIN
) -> int | None:
    """How many client connections fit in ``descriptors`` (None: no limit) beside the CouchDB side.

    Each download may need one CouchDB connection of its own, so what is left
    after the fixed reserve is shared: up to ``max_downloads`` for those, and
    never less than half for the clients.
    """
    if descriptors == resource.RLIM_INFINITY:
        return None
    spare = max(2, descriptors - pool - feeds - margin)
    return max(1, spare - min(max_downloads, spare // 2))


def descriptor_limit() -> int:
    """The process's soft limit on open file descriptors."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ConnectionLimit:
    """Counts open client connections; says whether one more may be served."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._refusing = 0  # connections refused since refusing started (0: accepting)

    def admit(self) -> bool:
        """Whether a new connection may be served; logs once when refusing starts and ends."""
        if self.limit is None or self.open < self.limit:
            if self._refusing:
                _log.info(
                    "Accepting client connections again ({refused} refused meanwhile)",
                    refused=self._refusing,
                )
                self._refusing = 0
            return True
        self.refused += 1
        self._refusing += 1
        if self._refusing == 1:
            _log.warn(
                "{open} client connections are open, the most the file descriptor limit allows: "
                "refusing new ones until some close",
                open=self.open,
            )
        return False

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
