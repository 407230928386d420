"""Task functions and arguments as farpool pickles them, for workers farpool does not run
the loop of (Dask's, Ray's) and for the daemons'.

``CallPacker`` is the client's side: a function's blob carries, when needed, the pool
initializer (``InitializedCall``) and the client's code (``code_bundle``), and what the
main script defines pickles as ``__main__.NAME`` (``main_script``). The daemons' workers
unpickle such a blob in their worker loop. Dask and Ray get only bytes and
``run_packed``: so a script's functions share one set of globals with the initializer
there too, its classes are the same classes in the arguments, and the engines never
look inside the arguments (Dask's ``Client.submit`` took tuples in them for tasks).

On an engine's worker a client's namespace is installed and left in place (engine
workers serve one client at a time, mostly: Ray's are per job), so that the engine,
which pickles the result after ``run_packed`` returns, pickles script classes by name.

This module runs inside workers: it imports nothing heavy at import time.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["CallPacker", "run_packed"]

# Unpickled functions an engine worker process keeps, by key.
_FN_CACHE_SIZE = 256
_EMPTY_ARGS = pickle.dumps(((), {}), protocol=5)
_SIMPLE_TYPES = frozenset({int, float, str, bool, type(None), complex, bytes})


class CallPacker:
    """Pickles a client's task functions (once each) and arguments for its workers."""

    def __init__(self, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 *, ship_modules: Any = True) -> None:
        from . import serialize
        from .code_bundle import BundleMaker
        from .initializer import InitSpec

        self.bundles = BundleMaker(ship_modules)
        self.main = self.bundles.main is not None
        self.init = (InitSpec.create(initializer, initargs, main=self.main)
                     if initializer is not None else None)
        self._serialize = serialize
        self._pickle_fn = serialize.FunctionPickler(main=self.main)
        self._wrapped: dict[tuple[bytes, str], tuple[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def function(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        """``(key, blob)`` for ``fn``: the key is the blob's digest."""
        with self._lock:
            key, blob = self._pickle_fn(fn)
            bundle = self.bundles.current()
            if self.init is None and bundle is None:
                return key, blob
            cache_key = (key, bundle.digest if bundle is not None else "")
            hit = self._wrapped.get(cache_key)
            if hit is None:
                if self.init is not None:
                    from .initializer import InitializedCall

                    blob = pickle.dumps(InitializedCall(self.init, blob), protocol=5)
                if bundle is not None:
                    from .code_bundle import with_code

                    blob = with_code(bundle, blob)
                hit = (hashlib.blake2b(blob, digest_size=16).digest(), blob)
                if len(self._wrapped) > 1024:
                    self._wrapped.clear()
                self._wrapped[cache_key] = hit
            return hit

    def frames(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, chunked: bool = False) -> list[Any]:
        """A call's arguments as frames (the daemons' wire: large buffers apart)."""
        return self._serialize.dumps_args(args, kwargs, chunked=chunked, main=self.main)

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """A call's arguments as one pickle (what an engine carries)."""
        if not kwargs:
            if not args:
                return _EMPTY_ARGS
            if all(type(a) in _SIMPLE_TYPES for a in args):
                return pickle.dumps((args, kwargs), protocol=5)
        return self._serialize.dumps_whole((args, kwargs), main=self.main)


# -- in an engine's worker --------------------------------------------------------------------

_fns: OrderedDict[bytes, Any] = OrderedDict()
_fns_lock = threading.Lock()


def run_packed(key: bytes, blob: bytes, arguments: bytes) -> Any:
    """In a Dask or Ray worker: run a task ``CallPacker`` packed."""
    with _fns_lock:
        fn = _fns.get(key)
        if fn is None:
            fn = _fns[key] = pickle.loads(blob)
            if len(_fns) > _FN_CACHE_SIZE:
                _fns.popitem(last=False)
        else:
            _fns.move_to_end(key)
    from . import code_bundle  # loaded already when the blob carried code

    if type(fn) is code_bundle.InNamespace:
        fn.namespace.install()
        fn = fn.fn
    args, kwargs = pickle.loads(arguments)
    from . import serialize

    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - goes to the client as farpool's frames
        frames = serialize.dump_exception(exc)
    else:
        return PackedResult(serialize.dumps(result))
    # Raised outside the except block: no __context__, which the engines pickle too
    # (tblib) and which may not rebuild in the client.
    raise PackedError(frames)


class PackedError(Exception):
    """A task's exception as farpool's frames (see ``PackedResult``): the engine moves
    bytes, and the client rebuilds the exception, or says what it was if it cannot."""

    def __init__(self, frames: list[Any]) -> None:
        super().__init__("a farpool task's exception, rebuilt by the client")
        self.frames = frames

    def __reduce__(self) -> tuple[Any, ...]:
        return PackedError, (self.frames,)

    def unpack(self, engine: str) -> BaseException:
        from . import serialize
        from .errors import unpickling_failed

        try:
            return serialize.load_exception(self.frames)
        except BaseException as error:  # noqa: BLE001 - an unreadable exception
            return unpickling_failed(f"the exception of a task on {engine}", error)


class PackedResult:
    """A task's result as farpool's pickle frames, so that the engine moves bytes and
    the client unpickles it itself: a result that does not rebuild there is then an
    ``UnpicklingFailed`` like on every other backend, not the engine's own error."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames

    def __reduce__(self) -> tuple[Any, ...]:
        return PackedResult, (self.frames,)


def unpack_result(value: Any, engine: str) -> tuple[Any, BaseException | None]:
    """On the client: ``(result, None)``, or ``(None, UnpicklingFailed)``."""
    if type(value) is not PackedResult:
        return value, None
    from . import serialize
    from .errors import unpickling_failed

    try:
        return serialize.loads(value.frames), None
    except BaseException as error:  # noqa: BLE001 - an unreadable result
        return None, unpickling_failed(f"the result of a task on {engine}", error)
