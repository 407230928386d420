"""Scheduling decisions with no sockets: which task goes to which worker, and what a
lost worker means. The I/O loops (client, scheduler daemon, worker supervisor) feed
it events and send what it decides.

Credit: a worker may hold ``slots + prefetch`` tasks. Run times are averaged per
function; prefetch only ever takes tasks of functions measured to be short (about
``PREFETCH_WINDOW`` seconds of work in all), so short tasks stream without a round
trip each, while a task of a slow or never-timed function is only handed to a
worker with a free slot: it never waits behind another task while a worker idles.
Nor is anything prefetched to a worker running a long or never-timed task, or a task
of a short function that has run past ``NO_PREFETCH_ABOVE`` (this call is not short):
short tasks would wait behind it while another worker idles. Every free slot is served
before any worker gets tasks ahead, and tasks ahead are shared evenly.

Fairness: each client has its own queue, and dispatch takes from them in turn, so a
client's 100,000-task map does not starve another client's single task.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Seconds of queued work a worker may hold beyond its running slots.
PREFETCH_WINDOW = 0.002
MAX_PREFETCH = 256
# Tasks longer than this get no prefetch at all.
NO_PREFETCH_ABOVE = 0.005
_EMA_WEIGHT = 0.2
_MAX_TIMED_FUNCTIONS = 4096


def _priority(task: Task) -> int:
    options = task.options
    return options.priority if options is not None else 0


def task_label(fn: Any) -> str:
    """How errors and logs name a task's function."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


@dataclass(eq=False, slots=True)  # slots: one is made per task
class Task:
    """One task in flight. ``frames`` are opaque payload frames."""

    task_id: int
    fn_key: bytes
    fn_blob: Any
    frames: list[Any]
    client: bytes = b""
    label: str = ""
    attempts: int = 0
    # Handed to a worker before (then requeued, its worker lost): its future is
    # running already, and must not be set running twice.
    sent: bool = False
    # Opaque for the dispatcher; the I/O loop keeps what it needs here.
    context: Any = None
    # task_control.TaskOptions from Executor.options(...), or None. A time limit's
    # clock starts once the task heads its worker's queue (TaskControl.head_began).
    options: Any = None


@dataclass(eq=False, slots=True)
class WorkerSlot:
    """What the dispatcher knows of one worker."""

    worker_id: bytes
    slots: int
    tasks_left: int | None = None  # max_tasks_per_child budget, None for unlimited
    # Tasks sent and not yet answered, in the order the worker runs them (a dict
    # keeps insertion order, and is cheaper than an OrderedDict on every task).
    held: dict[int, Task] = field(default_factory=dict)
    retiring: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    busy_since: float = 0.0  # when the task it runs now began (about: when it was handed)

    def credit(self, prefetch: int) -> int:
        if self.retiring:
            return 0
        room = self.slots + prefetch - len(self.held)
        if self.tasks_left is not None:
            room = min(room, self.tasks_left)
        return max(room, 0)


class Dispatcher:
    """Queues per client, workers with credit, and the tasks each worker holds."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.queues: OrderedDict[bytes, deque[Task]] = OrderedDict()
        self.workers: OrderedDict[bytes, WorkerSlot] = OrderedDict()
        # Moving average of run time per function (fn_key). Forgotten all at once when
        # full: rare, and cheaper on every task than keeping it in LRU order.
        self.fn_seconds: dict[bytes, float] = {}
        self.queued = 0
        self.done = 0
        # Clients whose queue holds a task with a priority: their submits are sorted in
        # (the others only append). Forgotten when the queue empties.
        self.prioritized: set[bytes] = set()

    # -- tasks ---------------------------------------------------------------------
    def requeue(self, tasks: list[Task]) -> None:
        """Put ``tasks`` back at the head of their queues, keeping their order (a lost
        worker's tasks: they were submitted before anything still queued)."""
        for task in reversed(tasks):
            self.submit(task, front=True)

    def submit(self, task: Task, *, front: bool = False) -> None:
        queue = self.queues.get(task.client)
        if queue is None:
            queue = self.queues[task.client] = deque()
        if front:
            queue.appendleft(task)
        else:
            options = task.options
            priority = options.priority if options is not None else 0
            if priority or task.client in self.prioritized:
                self._insert_by_priority(queue, task, priority)
            else:
                queue.append(task)
        self.queued += 1

    def _insert_by_priority(self, queue: deque[Task], task: Task, priority: int) -> None:
        """Behind every queued task of the same or a higher priority, ahead of the
        rest (Executor.options(priority=)): higher first, in order within one."""
        self.prioritized.add(task.client)
        at = len(queue)
        while at and _priority(queue[at - 1]) < priority:
            at -= 1
        queue.insert(at, task)

    def place(self, task: Task) -> WorkerSlot | None:
        """With nothing queued, give ``task`` straight to the first worker with a free
        slot (what ``assign`` would do, without the queue); None if none is free."""
        if self.queued:
            return None
        for worker in self.workers.values():
            if (len(worker.held) < worker.slots and not worker.retiring
                    and (worker.tasks_left is None or worker.tasks_left > 0)):
                if not worker.held:
                    worker.busy_since = self.clock()
                worker.held[task.task_id] = task
                if worker.tasks_left is not None:
                    worker.tasks_left -= 1
                return worker
        return None

    def cancel(self, client: bytes, task_ids: set[int]) -> list[Task]:
        """Drop queued tasks (not ones a worker holds); returns those dropped."""
        queue = self.queues.get(client)
        if not queue:
            return []
        kept: deque[Task] = deque()
        dropped: list[Task] = []
        for task in queue:
            (dropped if task.task_id in task_ids else kept).append(task)
        if kept:
            self.queues[client] = kept
        else:  # no empty queue left behind: _take would spend a turn on it
            del self.queues[client]
            self.prioritized.discard(client)
        self.queued -= len(dropped)
        return dropped

    def drop_client(self, client: bytes) -> list[Task]:
        """Forget a client's queued tasks (the client went away)."""
        queue = self.queues.pop(client, deque())
        self.prioritized.discard(client)
        self.queued -= len(queue)
        return list(queue)

    def finished(self, worker_id: bytes, task_id: int, seconds: float,
                 at: float | None = None) -> Task | None:
        """A worker answered a task (``at``: when, if not just now). Returns it, or None
        if the worker did not hold it."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return None
        task = worker.held.pop(task_id, None)
        if task is None:
            return None
        worker.busy_since = self.clock() if at is None else at  # when the next one began
        self.done += 1
        if not 0 <= seconds < math.inf:  # not run (cancelled while held): nothing to learn
            return task
        times = self.fn_seconds
        key = task.fn_key
        ema = times.get(key)
        if ema is not None:
            times[key] = ema + _EMA_WEIGHT * (seconds - ema)
        else:
            if len(times) >= _MAX_TIMED_FUNCTIONS:
                times.clear()
            times[key] = seconds
        return task

    # -- workers -------------------------------------------------------------------
    def add_worker(self, worker_id: bytes, slots: int = 1, *, max_tasks: int | None = None,
                   info: dict[str, Any] | None = None) -> WorkerSlot:
        slot = WorkerSlot(worker_id, max(1, slots), max_tasks, info=info or {})
        self.workers[worker_id] = slot
        return slot

    def remove_worker(self, worker_id: bytes) -> list[Task]:
        """Forget a worker; returns the tasks it held, oldest first."""
        worker = self.workers.pop(worker_id, None)
        return list(worker.held.values()) if worker else []

    def short(self, fn_key: bytes) -> bool:
        """True if tasks of this function are known to be short enough to prefetch."""
        ema = self.fn_seconds.get(fn_key)
        return ema is not None and ema <= NO_PREFETCH_ABOVE

    def busy_with_short(self, worker: WorkerSlot, now: float) -> bool:
        """Whether what ``worker`` runs now is known to be short (or it runs nothing):
        only then may tasks wait on it, prefetched. A worker in a long or never-timed
        task gets none, nor one whose task has run longer than a short one takes:
        short tasks queued behind it would wait while another idles."""
        if worker.held and now - worker.busy_since > NO_PREFETCH_ABOVE:
            return False
        short = self.short
        for running, task in enumerate(worker.held.values()):
            if running >= worker.slots:
                return True  # the rest were prefetched: short by construction
            if not short(task.fn_key):
                return False
        return True

    def prefetch(self) -> int:
        """How many tasks a worker may hold beyond its slots, judged by the next task."""
        for queue in self.queues.values():
            if queue:
                ema = self.fn_seconds.get(queue[0].fn_key)
                if ema is None or ema > NO_PREFETCH_ABOVE:
                    return 0
                return min(MAX_PREFETCH, int(PREFETCH_WINDOW / max(ema, 1e-7)))
        return 0

    def assign(self) -> Iterator[tuple[WorkerSlot, list[Task]]]:
        """Hand queued tasks to workers with credit; yields one batch per worker.

        First every free slot of every worker; then tasks of short functions ahead,
        shared evenly among the workers that may hold them (a short function's call
        may yet prove slow: what waits behind it is then as little as can be)."""
        if not self.queued or not self.workers:
            return
        prefetch = self.prefetch()
        now = self.clock()
        plan: dict[bytes, tuple[WorkerSlot, list[Task]]] = {}
        workers = list(self.workers.values())
        for worker in workers:
            free = min(worker.credit(0), max(0, worker.slots - len(worker.held)))
            if free and self.queued:
                self._give(worker, self._take(free, free), now, plan)
        if prefetch and self.queued:
            ahead = [w for w in workers if w.credit(prefetch) and self.busy_with_short(w, now)]
            ahead.sort(key=lambda w: len(w.held))  # tasks submitted one by one spread too
            while self.queued and ahead:
                share = -(-self.queued // len(ahead))
                for worker in list(ahead):
                    batch = self._take(0, min(share, worker.credit(prefetch)))
                    if batch:
                        self._give(worker, batch, now, plan)
                    if not batch or not worker.credit(prefetch):
                        ahead.remove(worker)
        yield from plan.values()

    def _give(self, worker: WorkerSlot, batch: list[Task], now: float,
              plan: dict[bytes, tuple[WorkerSlot, list[Task]]]) -> None:
        if not batch:
            return
        if not worker.held:
            worker.busy_since = now
        held = worker.held
        for task in batch:
            held[task.task_id] = task
        if worker.tasks_left is not None:
            worker.tasks_left -= len(batch)
        entry = plan.get(worker.worker_id)
        if entry is None:
            plan[worker.worker_id] = (worker, batch)
        else:
            entry[1].extend(batch)

    def _take(self, free: int, room: int) -> list[Task]:
        """Up to ``room`` tasks, one client at a time in turn; beyond the first ``free``
        (the worker's idle slots) only tasks of functions known to be short."""
        batch: list[Task] = []
        queues = self.queues
        idle_turns = 0  # clients in a row that gave nothing: stop after a full round
        while len(batch) < room and self.queued and idle_turns < len(queues):
            client, queue = next(iter(queues.items()))
            queues.move_to_end(client)
            # Take a fair share from this client before moving to the next one.
            share = max(1, (room - len(batch)) // max(1, len(queues)))
            taken = 0
            while queue and taken < share and len(batch) < room:
                if len(batch) >= free and not self.short(queue[0].fn_key):
                    break
                batch.append(queue.popleft())
                taken += 1
            self.queued -= taken
            if not queue:
                del queues[client]
                self.prioritized.discard(client)
            idle_turns = 0 if taken else idle_turns + 1
        return batch

    def idle(self) -> bool:
        return not self.queued and all(not w.held for w in self.workers.values())

    def has_room(self) -> bool:
        """Whether some worker could take a task now."""
        return any(len(w.held) < w.slots and not w.retiring for w in self.workers.values())

    @staticmethod
    def unplace(worker: WorkerSlot, task: Task) -> None:
        """Take back a task placed on ``worker`` that was cancelled before it went."""
        del worker.held[task.task_id]
        if worker.tasks_left is not None:
            worker.tasks_left += 1

    def take_all(self, held: bool) -> list[Task]:
        """Every queued task, and with ``held`` every task a worker holds (their
        workers forgotten): what a broken or stopped pool must fail."""
        tasks = [task for client in list(self.queues) for task in self.drop_client(client)]
        if held:
            for worker_id in list(self.workers):
                tasks.extend(self.remove_worker(worker_id))
        return tasks

    def cancel_for_shutdown(self, keep: int, cancel: Callable[[Task], bool]) -> None:
        """``shutdown(cancel_futures=True)``: the first ``keep`` queued tasks stay (for
        workers still starting), the rest are cancelled; one ``cancel`` refuses (it
        has started already: requeued after its worker died) stays queued too."""
        for client in list(self.queues):
            for task in self.drop_client(client):
                if keep > 0:
                    keep -= 1
                    self.submit(task)
                elif not cancel(task):
                    self.submit(task)

    def held_for(self, client: bytes) -> list[tuple[bytes, int]]:
        """(worker id, task id) of every task of ``client`` a worker holds."""
        return [(w.worker_id, t.task_id) for w in self.workers.values()
                for t in w.held.values() if t.client == client]

    def in_flight(self) -> int:
        return sum(len(w.held) for w in self.workers.values())


def sort_lost(held: list[Task], record: tuple[int | None, int | None] | None
              ) -> tuple[list[Task], list[Task], list[Task]]:
    """Sort the tasks a dead worker held (in the order it runs them) into
    ``(running, unreported, unstarted)``: the one it was running, those it finished
    without reporting, and those it never began, which may safely run elsewhere.

    ``record`` is ``(running, done)`` from the worker's state record: the id of the
    task it was running, else of the last one it finished (None for none). A worker
    may hold finished results back while it runs the next task (see worker_loop.py), so
    every held task before the running or last finished one ran: running those again
    could run a task twice. A ``done`` task that is not held was reported, and so were
    all before it. With no record at all (a whole host vanished), the first held task
    counts as running.
    """
    if record is None:
        return held[:1], [], held[1:]
    running, done = record
    ids = [task.task_id for task in held]
    if running is not None and running in ids:
        at = ids.index(running)
        return [held[at]], held[:at], held[at + 1 :]
    if done is not None and done in ids:
        at = ids.index(done) + 1
        return [], held[:at], held[at:]
    return [], [], list(held)


@dataclass
class LossPlan:
    """What a dead worker's tasks become (see ``plan_loss``)."""

    failed_running: list[Task]  # it was running them: they fail with the loss
    failed_unreported: list[Task]  # they ran, their results died with the worker
    requeue: list[Task]  # to run elsewhere, in this order, ahead of the queue


def plan_loss(held: list[Task], record: tuple[int | None, int | None] | None,
              retries_for: Callable[[Task], int]) -> LossPlan:
    """Decide what a lost worker means, the same for the local pool and the scheduler:
    the task it was running is retried (``attempts`` counts up, it runs first) while
    ``retries_for(task)`` allows, else it fails; tasks it finished without reporting
    fail (running them again could run them twice); tasks it never began requeue in
    their order. The caller words the errors and sends nothing of its own choosing."""
    running, unreported, unstarted = sort_lost(held, record)
    failed: list[Task] = []
    retried: list[Task] = []
    for task in running:
        if task.attempts < retries_for(task):
            task.attempts += 1
            retried.append(task)
        else:
            failed.append(task)
    return LossPlan(failed, unreported, retried + unstarted)
