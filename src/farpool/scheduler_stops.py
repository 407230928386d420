"""The scheduler's time limits and stops: what ``task_control`` decides, sent out.

The scheduler keeps each timed task's deadline (never the task's own process); a stop
goes to the worker's supervisor, the `farpool worker` that owns its process::

    client  --TASKS (limits)-->  scheduler: a task's clock starts when it heads its
                                 worker's queue (sent to it idle, or its results came)
    client  --STOP [ids]----->   scheduler: queued? CANCELLED; running? control.stop
                                 due(): soft --INTERRUPT [worker, task, False]--> supervisor
                                        kill --INTERRUPT [worker, task, True]---> supervisor
    supervisor: interrupt (TaskInterrupted raised in the task) or SIGKILL; a death
    comes back as LOST. The task's outcome goes to its client as TIMED_OUT or STOPPED
    (a result that was on its way at the limit stands), or it is retried.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from . import protocol
from .dispatch import Task
from .errors import TaskTimeout
from .protocol import Kind, PeerRole, Status
from .task_control import TaskControl, TaskOptions, Watch, outcome_of, retry_after_stop

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .scheduler_peers import Peer

log = logging.getLogger("farpool.scheduler")


def options_of(limits: protocol.TaskLimits) -> TaskOptions:
    return TaskOptions(timeout=limits.timeout, retries=limits.retries, grace=limits.grace,
                       priority=limits.priority)


class TaskStops:
    """Mixed into the Scheduler: the attributes below are the scheduler's."""

    control: TaskControl
    dispatcher: Dispatcher
    peers: dict[bytes, Peer]

    if TYPE_CHECKING:
        def send(self, identity: bytes, msg: list[Any]) -> None: ...
        def route(self, task: Task, status: int, payload: list[Any], duration: float) -> None: ...
        def retries_for(self, task: Task) -> int: ...

    def start_clocks(self, worker_id: bytes) -> None:
        """After tasks went to ``worker_id`` or its results came: the time limits of
        the tasks now at the head of its queue start (TaskControl.head_began)."""
        slot = self.dispatcher.workers.get(worker_id)
        if slot is None or not slot.held or next(iter(slot.held.values())).options is None:
            return
        self.control.head_began(worker_id, slot.held, slot.slots, time.monotonic())

    def on_stop(self, identity: bytes, peer: Peer | None, msg: protocol.Message) -> None:
        assert peer is not None
        if peer.role != PeerRole.CLIENT:
            raise protocol.ProtocolError(f"STOP from a {peer.role}")
        ids, grace = msg.body
        wanted = {peer.tasks[t].task_id for t in ids if t in peer.tasks}
        if not wanted:
            return  # finished meanwhile, or never this client's: nothing to look for
        for task in self.dispatcher.cancel(identity, wanted):
            wanted.discard(task.task_id)
            self.route(task, Status.CANCELLED, [], 0.0)
        if not wanted:
            return
        now = time.monotonic()
        for worker_id, slot in self.dispatcher.workers.items():
            for task_id in [t for t in slot.held if t in wanted]:
                self.control.stop(slot.held[task_id], worker_id, grace, now)
                self.interrupt(worker_id, task_id, kill=False)

    def act_on_timers(self, now: float) -> None:
        for action, watch in self.control.due(now):
            self.interrupt(watch.worker_id, watch.task.task_id, kill=action == "kill")

    def interrupt(self, worker_id: bytes, task_id: int, *, kill: bool) -> None:
        worker = self.peers.get(worker_id)
        owner = self.peers.get(worker.supervisor) if worker is not None else None
        if owner is None or owner.role != PeerRole.SUPERVISOR:
            log.warning("cannot stop task %s: worker %s has no supervisor to stop it",
                        task_id, worker.name if worker is not None else worker_id.hex())
            return
        self.send(owner.identity, protocol.encode(Kind.INTERRUPT, [worker_id, task_id, kill]))

    def stopped_result(self, task: Task, entry: protocol.ResultEntry) -> bool:
        """A worker answered a watched task: True if the answer is a stop's (then the
        task is retried or its client told), False if its own outcome stands."""
        ran = entry.duration if entry.status == Status.OK else None
        error = outcome_of(self.control.finished(task.task_id), ran, who="")
        if error is None:
            return False
        self.end_stopped(task, error, entry.duration)
        return True

    def end_stopped(self, task: Task, error: BaseException, duration: float = 0.0) -> None:
        if retry_after_stop(task, error, self.retries_for(task)):
            self.dispatcher.requeue([task])
            return
        status = Status.TIMED_OUT if isinstance(error, TaskTimeout) else Status.STOPPED
        self.route(task, status, [str(error).encode()], duration)

    def stopped_loss(self, watches: dict[int, Watch], task: Task) -> BaseException | None:
        """What a dead worker's watched task ends with (None: an ordinary loss)."""
        return outcome_of(watches.get(task.task_id), None, died=True, who="")
