"""Pool initializers: running one, and carrying one to workers that are not the pool's.

A local pool runs its initializer as each worker starts (``run_initializer``). The
workers of a scheduler or of an engine (Dask, Ray) are shared and started by someone
else, so there the initializer travels with the tasks, pickled once as an
``InitSpec``, and each worker process runs it before its first task of that executor
(``ensure_initialized``); a failure is kept, so every later task of the executor
fails alike with ``InitializerFailed`` and the executor breaks, as the stdlib's does.

This module runs inside workers: it imports nothing heavy.
"""

from __future__ import annotations

import pickle
import threading
import traceback
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from .errors import InitializerFailed

__all__ = ["InitSpec", "InitializedCall", "ensure_initialized", "run_initializer"]


def run_initializer(initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> str | None:
    """Run a pool initializer; return the formatted error if it failed."""
    if initializer is None:
        return None
    try:
        initializer(*initargs)
    except BaseException:  # noqa: BLE001 - reported to the pool, which breaks
        import logging  # only now: worker start-up time

        # Where and how the stdlib pools report it, so logging set up for them (even by
        # the initializer itself) sees it.
        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        return traceback.format_exc()
    return None


class InitSpec(NamedTuple):
    """A pool initializer as it travels to shared workers: pickled once, named by a
    token so each worker process runs it once per executor."""

    token: str
    blob: bytes

    @classmethod
    def create(cls, initializer: Callable[..., Any], initargs: tuple[Any, ...], *,
               main: bool = False) -> InitSpec:
        """``main`` as for ``serialize.dumps``."""
        from . import serialize  # late: workers never create one

        return cls(uuid.uuid4().hex, serialize.dumps_whole((initializer, tuple(initargs)), main=main))


# token -> None once the initializer ran, or its formatted error. Per worker process.
_initialized: dict[str, str | None] = {}
_init_lock = threading.Lock()
_MISSING = object()


def ensure_initialized(spec: InitSpec) -> None:
    """In a worker: run ``spec``'s initializer if this process has not yet."""
    state = _initialized.get(spec.token, _MISSING)
    if state is _MISSING:
        # A worker may run several tasks at once: the first one initializes.
        with _init_lock:
            state = _initialized.get(spec.token, _MISSING)
            if state is _MISSING:
                state = _run_pickled(spec.blob)
                _initialized[spec.token] = state
    if isinstance(state, str):
        raise InitializerFailed(state)


def _run_pickled(blob: bytes) -> str | None:
    try:
        initializer, initargs = pickle.loads(blob)
    except BaseException:  # noqa: BLE001 - reported as a failed initializer
        return "the initializer could not be unpickled in the worker:\n" + traceback.format_exc()
    return run_initializer(initializer, initargs)


class InitializedCall:
    """A task function (as its pickle) that first makes sure its executor's
    initializer ran in this worker process. The scheduler's workers cache functions
    by their pickle's digest, so the initializer rides inside the function's blob."""

    def __init__(self, spec: InitSpec, fn_blob: bytes) -> None:
        self.spec = spec
        self.fn_blob = fn_blob
        self._fn: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": tuple(self.spec), "fn_blob": self.fn_blob}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = InitSpec(*state["spec"])
        self.fn_blob = state["fn_blob"]
        self._fn = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ensure_initialized(self.spec)
        if self._fn is None:
            self._fn = pickle.loads(self.fn_blob)
        return self._fn(*args, **kwargs)
