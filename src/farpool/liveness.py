"""When a silent peer counts as gone, and how long a lost one is waited for.

No sockets and no clock of their own: the I/O loops (the scheduler, the worker
daemon, the remote client) pass ``now`` (``time.monotonic()``) and act on the answer,
so the rules are tested with a fake clock. Every side uses the same rule: a peer is
gone after ``liveness`` heartbeat intervals of silence, judged by the slower of the
two intervals (a peer that beats slower than we do is not lost for it).
"""

from __future__ import annotations


def heartbeat_limit(ours: float, liveness: int, theirs: float = 0.0) -> float:
    """Seconds of silence after which a peer counts as gone."""
    return max(ours, theirs) * liveness


def silent_too_long(last_heard: float, now: float, ours: float, liveness: int,
                    theirs: float = 0.0) -> bool:
    """Whether a peer last heard at ``last_heard`` is gone at ``now``."""
    return now - last_heard > heartbeat_limit(ours, liveness, theirs)


class ReconnectWindow:
    """How long a client waits for a lost scheduler to return before it gives up.

    ``lost(now)`` when the scheduler is noticed gone (silent, or it said it does not
    know us); ``back()`` when it welcomes us again; ``expired(now)`` once the window
    has passed with no welcome. A window that never started (we were never told we
    are lost) starts at the first ``expired`` call, so it is never zero.
    """

    __slots__ = ("timeout", "lost_since")

    def __init__(self, timeout: float) -> None:
        if not timeout >= 0:  # also refuses NaN
            raise ValueError(f"reconnect timeout must be >= 0 seconds, not {timeout!r}")
        self.timeout = timeout
        self.lost_since: float | None = None

    def lost(self, now: float) -> None:
        """The peer is gone; a second call while lost keeps the first moment."""
        if self.lost_since is None:
            self.lost_since = now

    def back(self) -> None:
        """The peer answered: the next loss opens a fresh window."""
        self.lost_since = None

    def waited(self, now: float) -> float:
        """Seconds since the peer was lost (0 when it is not)."""
        return 0.0 if self.lost_since is None else now - self.lost_since

    def expired(self, now: float) -> bool:
        """Whether the peer has been gone for longer than the window."""
        self.lost(now)
        return self.waited(now) > self.timeout
