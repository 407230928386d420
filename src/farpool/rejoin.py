"""What a scheduler keeps across a restart (or a client's reconnection), with no sockets.

A scheduler restart loses its memory, not the work: worker processes keep running
their tasks, and clients resubmit what they have no answer for. To meet again, a task
has the same id in every scheduler session: ``task_key`` is a digest of the client's
key, its connection identity and the client's own task id, all three the same after
the client reconnects. The reports then meet the resubmission in whatever order they
come:

- a result no held task claims (sent while no scheduler was there, or by a worker the
  scheduler does not know yet) is *kept* for a while, and a resubmission of its task
  is answered with it instead of running the task again;
- a task a rejoining supervisor says one of its processes is running is *expected*:
  its resubmission *waits* for that result instead of running elsewhere, and fails
  (or retries) only if that process dies.

What can still run twice: a task whose result was in flight when the scheduler died,
and one on a host that rejoins after the restart's grace; see the README. A host's
report is trusted as its worker key is: a host that lies about what it runs can hold
those tasks' resubmissions waiting (it could as well have answered them falsely).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .dispatch import Task

# How long a result nobody claims is kept: well past a client's reconnect window.
KEEP_SECONDS = 60.0
MAX_KEPT = 100_000
MAX_KEPT_BYTES = 64 * 1024 * 1024  # bounds what a peer's unclaimed results can cost


def task_key(client_key: bytes | None, client: bytes, client_task: int) -> int:
    """A task's scheduler id, the same in every session: a 63-bit digest of who sent it
    (its CURVE key, if any, and its random connection identity) and the client's own
    id. Another peer cannot work out a client's next ids, so it cannot plant results
    for them; a worker learns only the ids of the tasks it is given."""
    h = hashlib.blake2b(digest_size=8, key=(client_key or b"")[:64])
    h.update(len(client).to_bytes(2, "little"))
    h.update(client)
    h.update(client_task.to_bytes(8, "little", signed=False))
    return (int.from_bytes(h.digest(), "little") >> 1) or 1  # never 0: state records use it


@dataclass(slots=True)
class Outcome:
    """A task's result as a worker sent it, kept until its task is resubmitted."""

    status: int
    payload: list[Any]
    duration: float
    expires: float
    size: int


def _size(payload: list[Any]) -> int:
    return sum(len(getattr(frame, "buffer", frame)) for frame in payload)


class Reclaims:
    """Kept results, expected tasks and the resubmissions waiting for them."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 keep_seconds: float = KEEP_SECONDS, max_kept: int = MAX_KEPT,
                 max_kept_bytes: int = MAX_KEPT_BYTES) -> None:
        self.clock = clock
        self.keep_seconds = keep_seconds
        self.max_kept = max_kept
        self.max_kept_bytes = max_kept_bytes
        self.kept: OrderedDict[int, Outcome] = OrderedDict()  # oldest first
        self.kept_bytes = 0
        self.expected: dict[int, bytes] = {}  # task id -> the worker running it
        self.waiting: dict[int, Task] = {}  # resubmitted, waiting for an expected result
        # Workers a supervisor reported that have not said HELLO since: worker -> supervisor.
        self.rejoining: dict[bytes, bytes] = {}
        self.dropped = 0  # results let go unclaimed (expired or over the caps)

    # -- reports from workers ---------------------------------------------------------
    def expect(self, worker: bytes, supervisor: bytes, running: int | None) -> None:
        """A rejoining supervisor's process ``worker`` runs task ``running`` (or nothing)."""
        self.rejoining[worker] = supervisor
        if running is not None:
            self.expected[running] = worker

    def joined(self, worker: bytes) -> None:
        self.rejoining.pop(worker, None)

    def unclaimed(self, task_id: int, status: int, payload: list[Any],
                  duration: float) -> Task | None:
        """A result that no task held by its sender (for a client still there) claims:
        the resubmitted task waiting for it, if any; else it is kept (None)."""
        self.expected.pop(task_id, None)
        task = self.waiting.pop(task_id, None)
        if task is not None:
            return task
        now = self.clock()
        self.expire(now)
        old = self.kept.pop(task_id, None)
        if old is not None:
            self.kept_bytes -= old.size
        size = _size(payload)
        self.kept[task_id] = Outcome(status, payload, duration, now + self.keep_seconds, size)
        self.kept_bytes += size
        while self.kept and (len(self.kept) > self.max_kept or self.kept_bytes > self.max_kept_bytes):
            self._drop_oldest()
        return None

    # -- a client's (re)submission ----------------------------------------------------
    def take_kept(self, task_id: int) -> Outcome | None:
        """The kept result of a resubmitted task, if one came (and is still kept)."""
        outcome = self.kept.pop(task_id, None)
        if outcome is None:
            return None
        self.kept_bytes -= outcome.size
        if outcome.expires < self.clock():
            self.dropped += 1
            return None
        return outcome

    def park(self, task: Task) -> bool:
        """True if ``task`` is running on a worker already: it waits for that result."""
        if task.task_id not in self.expected:
            return False
        task.sent = True  # its future is running: a retry must not set it running again
        self.waiting[task.task_id] = task
        return True

    def cancel_waiting(self, client: bytes) -> list[Task]:
        """A client left: forget its waiting tasks (their results will be kept unclaimed)."""
        gone = [t for t in self.waiting.values() if t.client == client]
        for task in gone:
            del self.waiting[task.task_id]
        return gone

    # -- losses -------------------------------------------------------------------------
    def worker_lost(self, worker: bytes) -> list[Task]:
        """``worker`` died (or its host is gone) before its expected results came: the
        resubmitted tasks that waited for them, to retry or fail as a lost worker's."""
        self.rejoining.pop(worker, None)
        ids = [task_id for task_id, w in self.expected.items() if w == worker]
        lost = []
        for task_id in ids:
            del self.expected[task_id]
            task = self.waiting.pop(task_id, None)
            if task is not None:
                lost.append(task)
        return lost

    def supervisor_lost(self, supervisor: bytes) -> list[Task]:
        """A supervisor is gone: the waiting tasks of its processes that had not said
        HELLO again (a joined worker's loss comes through the scheduler's worker_lost)."""
        lost: list[Task] = []
        for worker in [w for w, s in self.rejoining.items() if s == supervisor]:
            lost += self.worker_lost(worker)
        return lost

    def expire(self, now: float) -> None:
        while self.kept:
            task_id, outcome = next(iter(self.kept.items()))
            if outcome.expires >= now:
                return
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, outcome = self.kept.popitem(last=False)
        self.kept_bytes -= outcome.size
        self.dropped += 1
