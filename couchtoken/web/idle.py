"""The idle timeout: cut a client that reads nothing, for the file sender and the relay alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

_log = Logger()


class IdleCut:
    """Cuts a client whose connection stays paused for ``timeout`` seconds.

    The producer tells it when the client's transport pauses it (``paused``),
    resumes it (``resumed``) and when the download ends (``stop``).  With no
    clock or no timeout it does nothing.  On cutting, ``on_idle`` is called
    (the metric), then ``cut`` (which breaks the client's connection off).
    """

    def __init__(
        self,
        clock: Any,
        timeout: float | None,
        *,
        on_idle: Callable[[], None],
        cut: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_idle = on_idle
        self._cut = cut
        self._call: Any = None
        self._stopped = False

    def paused(self) -> None:
        if self._clock is None or not self._timeout or self._call is not None or self._stopped:
            return
        self._call = self._clock.callLater(self._timeout, self._client_stuck)

    def resumed(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def stop(self) -> None:
        self._stopped = True
        self.resumed()

    def _client_stuck(self) -> None:
        self._call = None
        _log.info("A client read nothing for {seconds:g}s; cutting its download", seconds=self._timeout)
        self._on_idle()
        self._cut()
