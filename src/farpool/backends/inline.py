"""``inline``: each task runs in the caller at submit time, still through the pickle
round trip, so what works here works on a real pool. For debugging with pdb."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from .. import serialize
from ..errors import ProcessPoolBroken, unpickling_failed
from ..futures import new_future
from ..initializer import run_initializer
from .options import check_initializer, check_max_workers


class InlineBackend:
    broken_type = ProcessPoolBroken
    chunks = False

    def __init__(self, address: str, *, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        check_max_workers(max_workers, None)
        check_initializer(initializer)
        self.broken: BaseException | None = None
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._initialized = False
        self._done = 0

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Future:
        if self.broken is not None:
            raise self.broken_type(str(self.broken))
        future: Future = new_future()
        if not self._initialized:
            self._initialized = True
            if run_initializer(self._initializer, self._initargs) is not None:
                self.broken = self.broken_type(
                    "A process initializer failed, the process pool is not usable anymore")
                raise self.broken_type(str(self.broken))
        # Failures as on a process pool: a pickling error as itself, an unpickling
        # error as UnpicklingFailed (a BrokenProcessPool).
        try:
            frames = serialize.dumps((fn, args, kwargs), main=True)
        except BaseException as exc:  # noqa: BLE001 - as a pool: the future fails
            future.set_exception(exc)
            return future
        try:
            call = serialize.loads(frames)
        except BaseException as exc:  # noqa: BLE001
            future.set_exception(unpickling_failed("the function or arguments", exc))
            return future
        future.set_running_or_notify_cancel()
        self._done += 1
        fn, args, kwargs = call
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            future.set_exception(_round_trip_error(exc))
            return future
        try:
            frames = serialize.dumps(result, main=True)
        except BaseException as exc:  # noqa: BLE001 - an unpicklable result
            future.set_exception(_round_trip_error(exc))
            return future
        try:
            future.set_result(serialize.loads(frames))
        except BaseException as exc:  # noqa: BLE001
            future.set_exception(unpickling_failed("the result", exc))
        return future

    def submit_many(self, fn: Callable[..., Any],
                    calls: Iterable[tuple[Any, ...]]) -> list[Future]:
        return [self.submit(fn, args, {}) for args in calls]

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        """Tasks run so far; nothing is ever queued or running between calls."""
        return {"workers": 0, "queued": 0, "running": 0, "done": self._done, "pending": 0}


def _round_trip_error(exc: BaseException) -> BaseException:
    """A task's exception as a process pool's client would get it back."""
    try:
        return serialize.load_exception(serialize.dump_exception(exc))
    except BaseException as err:  # noqa: BLE001 - the exception did not unpickle
        return unpickling_failed("the exception", err)
