"""Log lines a peer can provoke at will (a malformed message, a refused key), written at
most once a second so that one hammering the port cannot flood the log."""

from __future__ import annotations


class OncePerSecond:
    """``passes(now)``: whether this occurrence is logged, and how many were held back
    since the last one logged; None when it is held back itself."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = float("-inf")
        self._held = 0

    def passes(self, now: float) -> int | None:
        if now - self._last < self.interval:
            self._held += 1
            return None
        held, self._last, self._held = self._held, now, 0
        return held
