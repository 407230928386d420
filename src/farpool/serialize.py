"""Pickling for the wire: cloudpickle, protocol 5, large buffers as their own frames.

``dumps`` returns a list of frames: the pickle stream first, then one frame per
out-of-band buffer (NumPy arrays, large bytes), which ZeroMQ sends without copying
and ``loads`` rebuilds without copying.

Over the network (``chunked=True``: the tcp backend and daemon workers), a very large
buffer goes as 4 MiB chunks instead, after a small layout frame
(``b"L"`` + chunk counts; a pickle stream never starts with ``L``). ZeroMQ encrypts
and decrypts (CURVE) and copies frame by frame, so the sender's and the receiver's
I/O threads work on different chunks at once instead of one after the other: a 100 MB
array echoed through a CURVE scheduler on loopback took 1.1 s instead of 2.2-3.3 s.
The receiver joins the chunks back, a copy that costs more than it saves where
nothing is encrypted (local ipc), so local pools send whole buffers.

Functions are pickled once and named by a digest of their pickle (``fn_key``), so a
receiver that has seen a function skips both the bytes and the unpickling.
"""

from __future__ import annotations

import io
import operator
import pickle
import struct
import sys
import traceback
import types
from collections import ChainMap, OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle

from .fncache import FN_CACHE_SIZE, SentFunctions  # noqa: F401 - re-exported for senders
from .main_script import main_reference

# Buffers below this size are cheaper inside the pickle stream than as a frame.
OUT_OF_BAND_MIN_BYTES = 64 * 1024
# Buffers above CHUNK_MIN_BYTES travel as CHUNK_BYTES frames (see the module docstring).
CHUNK_BYTES = 4 << 20
CHUNK_MIN_BYTES = 2 * CHUNK_BYTES
_LAYOUT = b"L"

_SIMPLE_TYPES = frozenset({int, float, str, bool, type(None), complex})
_cloudpickle_code_reduce = getattr(cloudpickle.cloudpickle, "_code_reduce", None)


def _code_reduce(code: types.CodeType) -> Any:
    rebuild, args = _cloudpickle_code_reduce(code)  # type: ignore[misc]
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


class Pickler(cloudpickle.Pickler):
    """cloudpickle's pickler, except that code pickled by value (a lambda, a closure)
    keeps its file name, where cloudpickle writes ``<dynamic-code>``: a worker's
    traceback then names the file and shows the source line, as with the stdlib's
    process pool."""

    if _cloudpickle_code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)


class MainPickler(Pickler):
    """``Pickler``, and what the main script defines pickles as a name (the global
    ``__main__.NAME``), not by value: the workers have the script as a module (see
    ``main_script``). A class of its own, so that other pickles pay nothing per object."""

    def reducer_override(self, obj: Any) -> Any:
        if (type(obj) is types.FunctionType or isinstance(obj, type)) and main_reference(obj):
            return NotImplemented
        return super().reducer_override(obj)


def pickler(main: bool) -> type[Pickler]:
    """The pickler class for ``main`` (see ``dumps``)."""
    return MainPickler if main else Pickler


def _cloudpickle(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None,
                 main: bool = False) -> bytes:
    with io.BytesIO() as file:
        pickler(main)(file, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def dumps_whole(obj: Any, *, main: bool = False) -> bytes:
    """``obj`` as one pickle, buffers inside (for what travels nested in another)."""
    return _cloudpickle(obj, main=main)


_EMPTY_ARGS = pickle.dumps(((), {}), protocol=5)


def dumps(obj: Any, *, chunked: bool = False, main: bool = False) -> list[Any]:
    """Pickle ``obj`` into frames: [stream, *out_of_band_buffers]; with ``chunked``,
    buffers above CHUNK_MIN_BYTES go as chunks after a layout frame; ``main`` says how
    to name what the main script defines: as globals (where the workers have the script
    as ``__main__``, see ``main_script``), else by value."""
    if type(obj) in _SIMPLE_TYPES:
        # The same bytes as cloudpickle's, without setting up its pickler (~5x faster).
        return [pickle.dumps(obj, protocol=5)]
    buffers: list[pickle.PickleBuffer] = []

    def collect(buf: pickle.PickleBuffer) -> bool:
        # True keeps a buffer in the pickle stream; False sends it as its own frame.
        view = memoryview(buf)
        if view.nbytes < OUT_OF_BAND_MIN_BYTES or not view.contiguous:
            return True
        buffers.append(buf)
        return False

    stream = _cloudpickle(obj, collect, main)
    views = [b.raw() for b in buffers]
    if not chunked or not any(v.nbytes > CHUNK_MIN_BYTES for v in views):
        return [stream, *views]
    counts: list[int] = []
    chunks: list[Any] = []
    for view in views:
        parts = [view[i : i + CHUNK_BYTES] for i in range(0, view.nbytes, CHUNK_BYTES)] or [view]
        counts.append(len(parts))
        chunks.extend(parts)
    return [_LAYOUT + struct.pack(f"<{len(counts)}I", *counts), stream, *chunks]


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any], *, chunked: bool = False,
               main: bool = False) -> list[Any]:
    """Frames for a call's arguments, with a fast path for plain scalars."""
    if not kwargs:
        if not args:
            return [_EMPTY_ARGS]
        if all(type(a) in _SIMPLE_TYPES for a in args):
            return [pickle.dumps((args, kwargs), protocol=5)]
    return dumps((args, kwargs), chunked=chunked, main=main)


def loads(frames: list[Any]) -> Any:
    """Rebuild an object from the frames ``dumps`` produced."""
    head = frames[0]
    head = getattr(head, "buffer", head)
    if len(frames) == 1:
        return pickle.loads(head)
    if head[:1] == _LAYOUT:
        return _load_chunked(head, frames[1:])
    return pickle.loads(head, buffers=[getattr(f, "buffer", f) for f in frames[1:]])


def _load_chunked(layout: Any, frames: list[Any]) -> Any:
    """Rebuild an object whose large buffers came as chunks (see ``dumps``)."""
    layout = bytes(layout[1:])
    if len(layout) % 4:
        raise ValueError("malformed chunk layout frame")
    counts = struct.unpack(f"<{len(layout) // 4}I", layout)
    parts = [memoryview(getattr(f, "buffer", f)) for f in frames[1:]]
    if sum(counts) != len(parts) or 0 in counts:
        raise ValueError(f"chunk layout counts {sum(counts)} chunks, message has {len(parts)}")
    buffers: list[Any] = []
    pos = 0
    for count in counts:
        group = parts[pos : pos + count]
        pos += count
        if count == 1:
            buffers.append(group[0])
            continue
        joined = bytearray(sum(p.nbytes for p in group))
        offset = 0
        for part in group:
            joined[offset : offset + part.nbytes] = part.cast("B")
            offset += part.nbytes
        buffers.append(joined)
    stream = frames[0]
    return pickle.loads(getattr(stream, "buffer", stream), buffers=buffers)


def _pickles_by_reference(fn: Any, main: bool = False) -> bool:
    """True when ``fn`` pickles as a plain import path, so its pickle never changes."""
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        return False
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if not module_name or "<" in qualname or (module_name == "__main__" and not main):
        return False
    by_value = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())
    if any(module_name == m or module_name.startswith(m + ".") for m in by_value):
        return False
    module = sys.modules.get(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


class FunctionPickler:
    """Pickles functions for the wire, reusing a pickle while it cannot have changed.

    A function that pickles by reference (an importable name) is pickled once. One
    pickled by value (a lambda, a closure, a ``__main__`` function) carries what it
    captured: its pickle is reused only while everything it captures (globals it
    names, closure cells, defaults, attributes, and the functions it calls that are
    pickled by value too) is the very same immutable objects as when it was pickled.
    Anything mutable in there, or anything rebound since, means a fresh pickle.
    ``main`` as for ``dumps``.
    """

    def __init__(self, capacity: int = 1024, *, main: bool = False) -> None:
        self._by_ref: OrderedDict[int, tuple[Any, bytes, bytes]] = OrderedDict()
        self._by_value: OrderedDict[int, tuple[list[Any], bytes, bytes]] = OrderedDict()
        self._capacity = capacity
        self._main = main

    def __call__(self, fn: Callable[..., Any]) -> tuple[bytes, bytes]:
        """Return ``(fn_key, blob)`` for ``fn``."""
        ident = id(fn)
        hit = self._by_ref.get(ident)
        if hit is not None and hit[0] is fn:
            return hit[1], hit[2]
        captured = _captured(fn)
        if captured is not None:
            old = self._by_value.get(ident)
            # captured[0] is fn itself, so a reused id cannot match.
            if old is not None and _same(old[0], captured):
                self._by_value.move_to_end(ident)
                return old[1], old[2]
        import hashlib  # here: worker processes never need it (start-up time)

        blob = _cloudpickle(fn, main=self._main)
        key = hashlib.blake2b(blob, digest_size=16).digest()
        if _pickles_by_reference(fn, self._main):
            # Holding fn keeps its id from being reused by another object.
            self._keep(self._by_ref, ident, (fn, key, blob))
        elif captured is not None:
            self._keep(self._by_value, ident, (captured, key, blob))
        return key, blob

    def _keep(self, cache: OrderedDict[int, Any], ident: int, entry: Any) -> None:
        cache[ident] = entry
        cache.move_to_end(ident)
        if len(cache) > self._capacity:
            cache.popitem(last=False)


# What a by-value function's pickle depends on, for FunctionPickler.
_IMMUTABLE_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None), range,
                              type(Ellipsis), type(NotImplemented), types.CodeType})
_MISSING = object()
_END = object()  # closes a variable-length group, so groups of other sizes never line up
_MAX_DEPTH = 4
# A plain dict (a weak one costs a weakref per lookup, on every submit), cleared
# when it grows past _GLOBAL_NAMES_MAX code objects.
_global_names_cache: dict[types.CodeType, tuple[str, ...]] = {}
_GLOBAL_NAMES_MAX = 4096


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _captured(fn: Any) -> list[Any] | None:
    """The objects ``fn``'s pickle is made of, in a fixed order; None if any of them
    may change in place (so the pickle may differ without any of them being rebound)."""
    if type(fn) is not types.FunctionType:
        return None
    out: list[Any] = []
    return out if _capture_function(fn, out, set(), 0) else None


def _capture_function(fn: types.FunctionType, out: list[Any], seen: set[int], depth: int) -> bool:
    seen.add(id(fn))
    out += (fn, fn.__code__, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__,
            fn.__defaults__, fn.__annotations__)
    if fn.__defaults__ and not all(_frozen(v) for v in fn.__defaults__):
        return False
    for group in (fn.__kwdefaults__, fn.__dict__):
        if group:
            for name, value in group.items():
                if not _frozen(value):
                    return False
                out += (name, value)
        out.append(_END)
    # Annotations are pickled too; they are compared by identity, not required immutable.
    out += fn.__annotations__.values()
    out.append(_END)
    values = [_cell_value(cell) for cell in fn.__closure__ or ()]
    names = _global_names(fn.__code__)
    scope = fn.__globals__
    values += [scope.get(name, _MISSING) for name in names]
    for value in values:
        out.append(value)
        if value is _MISSING or _frozen(value):
            continue
        if type(value) is not types.FunctionType or depth >= _MAX_DEPTH:
            return False
        # Another by-value function (a helper it calls, or itself when recursive).
        if id(value) not in seen and not _capture_function(value, out, seen, depth + 1):
            return False
    return True


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not assigned yet
        return _MISSING


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and the code nested in it) may look up as globals."""
    names = _global_names_cache.get(code)
    if names is None:
        found = dict.fromkeys(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(dict.fromkeys(_global_names(const)))
        if len(_global_names_cache) >= _GLOBAL_NAMES_MAX:
            _global_names_cache.clear()
        names = _global_names_cache[code] = tuple(found)
    return names


def _frozen(value: Any, depth: int = 0) -> bool:
    """True if ``value`` pickles the same for as long as it is the same object."""
    kind = type(value)
    if kind in _IMMUTABLE_TYPES:
        return True
    if kind is tuple or kind is frozenset:
        return depth < _MAX_DEPTH and len(value) <= 64 and all(_frozen(v, depth + 1) for v in value)
    if kind is types.ModuleType:
        # Pickled by name, unless registered to be pickled by value.
        by_value = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())
        return value.__name__ in sys.modules and value.__name__ not in by_value
    if kind is types.BuiltinFunctionType:
        # A builtin function, or a method bound to a module; not one bound to an object.
        owner = getattr(value, "__self__", None)
        return owner is None or type(owner) is types.ModuleType
    if kind is types.FunctionType or isinstance(value, type):
        return _pickles_by_reference(value)
    return False


class FunctionCache:
    """A bounded LRU of unpickled functions, on the receiving side.

    The sender mirrors it with ``SentFunctions``; both evict in the same order.
    """

    def __init__(self, capacity: int = FN_CACHE_SIZE) -> None:
        self._fns: OrderedDict[bytes, Any] = OrderedDict()
        self._capacity = capacity

    def put(self, key: bytes, blob: Any) -> None:
        try:
            fn: Any = loads([blob])
        except BaseException as exc:  # noqa: BLE001 - reported on every use
            fn = _Unloadable(exc, traceback.format_exc())
        self._fns[key] = fn
        self._fns.move_to_end(key)
        if len(self._fns) > self._capacity:
            self._fns.popitem(last=False)

    def get(self, key: bytes) -> Any:
        fn = self._fns[key]
        self._fns.move_to_end(key)
        if isinstance(fn, _Unloadable):
            raise fn.error
        return fn


class _Unloadable:
    def __init__(self, error: BaseException, tb: str) -> None:
        self.error = error
        self.tb = tb


def dump_exception(exc: BaseException) -> list[Any]:
    """Frames for a task's exception and its formatted traceback.

    The type's name, the message and the traceback travel as text beside the pickled
    exception, so a receiver that cannot rebuild the exception still says what it was.
    If the exception itself cannot be pickled, the pickling error is sent instead,
    with the original traceback in its message, so the future still fails clearly.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    name, message = type(exc).__qualname__, _message(exc)
    try:
        blob = _cloudpickle(exc, main=False)
    except BaseException as pickling_error:  # noqa: BLE001
        note = f"{type(pickling_error).__name__}: {pickling_error}"
        err = pickle.PicklingError(
            f"the task raised {type(exc).__name__}, which could not be pickled ({note})"
        )
        blob = _cloudpickle(err, main=False)
    return dumps((name, message, tb, blob))


def _message(exc: BaseException) -> str:
    try:
        return str(exc)[:2000]
    except Exception:  # noqa: BLE001 - a __str__ that raises
        return "(its message could not be read)"


def load_exception(frames: list[Any]) -> BaseException:
    """The exception a worker sent, with its remote traceback as ``__cause__``. One that
    does not unpickle here raises ``UnpicklingError`` naming its type and message, its
    ``__cause__`` the remote traceback."""
    name, message, tb, blob = loads(frames)
    from .errors import RemoteTraceback  # here: worker processes start without it

    remote = RemoteTraceback(f'\n"""\n{tb}"""')
    try:
        exc = pickle.loads(blob)
    except BaseException as error:  # noqa: BLE001
        raise pickle.UnpicklingError(
            f"the task raised {name}: {message} ({type(error).__name__}: {error})") from remote
    exc.__cause__ = remote
    return exc
