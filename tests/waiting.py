"""Wait on the real reactor for something to become true (bounded, never a bare sleep)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` (plain or async) until it is true; False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, interval)
