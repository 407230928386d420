"""When a dead worker process is replaced: at once, after a back-off, or never.

A worker that dies before it could work (before its HELLO, or within seconds with an
error) usually means a broken environment: an import that fails, a bad interpreter,
no memory. Respawning it at once, forever, would spin. ``StartFailures`` counts such
deaths in a row and answers for the two owners of worker processes:

- the local pool gives up (``give_up=True``): the pool breaks and says why, as the
  stdlib's pool breaks, rather than respawn in a loop the caller cannot see;
- the worker daemon backs off (0.5 s, doubling, at most 30 s): an operator may fix
  the host while it runs, and the daemon must not exit under systemd for it.

No sockets, no clock of its own: the caller passes ``now``.
"""

from __future__ import annotations

from typing import NamedTuple

START_FAILURE_LIMIT = 3  # deaths in a row before a start failure is the environment
QUICK_DEATH_SECONDS = 2.0  # a worker of the daemon that dies sooner failed to start
FIRST_DELAY = 0.5
MAX_DELAY = 30.0


class Respawn(NamedTuple):
    """What to do after a death: respawn at ``at`` (``now`` for at once), unless
    ``give_up``; ``failures`` is the count of start failures in a row."""

    at: float
    give_up: bool
    failures: int


class StartFailures:
    """Start failures in a row, and what they mean for the next respawn."""

    def __init__(self, *, give_up: bool, limit: int = START_FAILURE_LIMIT) -> None:
        self.give_up = give_up
        self.limit = limit
        self.failures = 0

    def started(self) -> None:
        """A worker started and said HELLO: the environment works."""
        self.failures = 0

    def died(self, *, failed_start: bool, now: float) -> Respawn:
        """A worker died; ``failed_start`` if it died before it could work. A death of
        a worker that did work ends the run of failures."""
        self.failures = self.failures + 1 if failed_start else 0
        if self.failures < self.limit:
            return Respawn(now, False, self.failures)
        if self.give_up:
            return Respawn(now, True, self.failures)
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (self.failures - self.limit))
        return Respawn(now + delay, False, self.failures)


def quick_death(lived: float, code: int | None) -> bool:
    """How the worker daemon tells a start failure: it exited with an error within
    ``QUICK_DEATH_SECONDS`` of its start (its HELLO goes to the scheduler, not to us)."""
    return lived < QUICK_DEATH_SECONDS and code != 0
