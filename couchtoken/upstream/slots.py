"""A hard bound on the requests couchtoken has open at CouchDB at once (feeds apart).

Every document read, attachment read and database check holds a slot from
before its request is sent until its response body has been read whole,
relayed whole, or dropped.  Requests past the bound wait their turn, in
order, for at most the response timeout (then 504).  Since the connection
pool only opens a connection when none is idle, at most this many
connections to CouchDB carry or wait for requests at any time.

Twisted's ``DeferredSemaphore`` does the counting and the queue; a waiter
that is cancelled (its client left) leaves the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore

Release = Callable[[], None]


class QueueTimeout(Exception):
    """No slot came free in time."""


class ConnectionSlots:
    """At most ``limit`` requests at once; the rest wait up to ``timeout`` seconds."""

    def __init__(self, limit: int, clock: Any, timeout: float) -> None:
        self._semaphore = DeferredSemaphore(limit)
        self._clock = clock
        self._timeout = timeout
        self.limit = limit

    @property
    def in_use(self) -> int:
        return self.limit - self._semaphore.tokens

    @property
    def waiting(self) -> int:
        return len(self._semaphore.waiting)

    async def acquire(self, timeout: float | None = None) -> Release:
        """Wait for a slot (``timeout`` instead of the default); returns the function that gives it back.

        Calling the function twice is harmless.
        """

        def timed_out(result: object, timeout: float) -> None:
            raise QueueTimeout()

        taking: Deferred[Any] = self._semaphore.acquire()
        await taking.addTimeout(timeout or self._timeout, self._clock, onTimeoutCancel=timed_out)
        given_back = False

        def release() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._semaphore.release()

        return release
