"""What a scheduler's answer to a task means for its future (the remote client's)."""

from __future__ import annotations

from typing import Any, Protocol

from .. import serialize
from ..errors import ProtocolError, TaskStopped, TaskTimeout, WorkerLost, unpickling_failed
from ..protocol import Status

# The error of a status whose payload is the scheduler's words (LOST, TIMED_OUT, ...).
_ERRORS: dict[int, type[Exception]] = {Status.LOST: WorkerLost, Status.TIMED_OUT: TaskTimeout,
                                       Status.STOPPED: TaskStopped}


class Answered(Protocol):
    """What ``settle`` reads of a remote client's task."""

    task_id: int
    label: str
    future: Any


def settle(task: Answered, status: int, payload: list[Any]) -> BaseException | None:
    """Give ``task``'s future the outcome the scheduler sent; the exception it got, if
    any. A task the scheduler could not run (LOST, REJECTED) fails with its reason."""
    future = task.future
    if status == Status.CANCELLED:
        future.cancel()  # its done callback wakes the waiters
        return None
    if future.cancelled() or not future.set_running_or_notify_cancel():
        return None
    try:
        if status == Status.OK:
            future.set_result(serialize.loads(payload))
            return None
        if status == Status.ERROR:
            exc = serialize.load_exception(payload)
        else:
            text = bytes(getattr(payload[0], "buffer", payload[0])).decode(errors="replace") \
                if payload else "no detail"
            kind = _ERRORS.get(status, ProtocolError)
            if status in (Status.TIMED_OUT, Status.STOPPED):  # "ran past its time limit..."
                exc = kind(f"task {task.task_id} ({task.label}) {text}")
            else:
                exc = kind(f"{text} (task {task.task_id}: {task.label})")
    except BaseException as error:  # noqa: BLE001 - an unreadable result
        what = "result" if status == Status.OK else "exception"
        exc = unpickling_failed(f"the {what} of task {task.task_id} ({task.label})", error)
    future.set_exception(exc)
    return exc
