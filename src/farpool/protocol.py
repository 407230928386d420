"""Message kinds and the frame layout on every farpool socket.

A message is a list of frames::

    frame 0      msgpack header: [PROTOCOL_VERSION, kind, body]
    frame 1..n   opaque payload frames, counted by the header

Payloads are pickles and raw buffers; this module never looks inside them (the
scheduler routes on headers alone). ``decode`` validates everything that comes off
a socket and raises ``ProtocolError`` for anything malformed, so callers can count,
log and drop it.

Bodies by kind (typed records below):

    HELLO      [info] -> [Hello]      worker or client -> peer: versions, pid, slots
    WELCOME    [info] -> [Welcome]    peer accepted the HELLO
    REFUSE     [reason]               peer refused the HELLO (versions, credentials)
    TASKS      [[TaskEntry...]]       a batch of tasks; frames: per task fn? + args
    RESULTS    [[ResultEntry...]]     a batch of results; frames: per result payload
    CANCEL     [[task_id...]]         client -> scheduler: drop these queued tasks
    HEARTBEAT  []                     liveness, both ways
    BYE        [reason]               an orderly goodbye (worker retiring, client done)
    STATUS     []                     ask a scheduler for its counters
    STATUS_REPLY [info]               the counters
    LOST       [info] -> [Lost]       supervisor -> scheduler: one of its worker
                                      processes died (worker id, how, running/done ids)
"""

from __future__ import annotations

import enum
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import msgpack
import zmq

from ._errors import ProtocolError, VersionMismatch

PROTOCOL_VERSION = 2  # 2: time limits and stops (STOP, INTERRUPT, TIMED_OUT, STOPPED)
# A header is small; anything larger is garbage or an attack.
MAX_HEADER_BYTES = 4 * 1024 * 1024
# Largest message a network-facing socket accepts (ZMQ_MAXMSGSIZE, per frame).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024 * 1024


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    TASKS = 4
    RESULTS = 5
    CANCEL = 6
    HEARTBEAT = 7
    BYE = 8
    STATUS = 9
    STATUS_REPLY = 10
    LOST = 11
    STOP = 12  # client -> scheduler: [[task ids], grace]: stop these tasks (Executor.stop)
    INTERRUPT = 13  # scheduler -> supervisor: [worker id, task id, kill]: a stop's two steps


class PeerRole(str, enum.Enum):
    """Who said HELLO to a scheduler (the ``role`` of its info)."""

    CLIENT = "client"  # submits tasks, receives results
    WORKER = "worker"  # a worker process: runs tasks
    SUPERVISOR = "supervisor"  # a `farpool worker` daemon: watches worker processes

    __str__ = str.__str__  # format as the wire's word (3.10 has no StrEnum)
    __format__ = str.__format__  # type: ignore[assignment]


class ByeReason(str, enum.Enum):
    """The BYE reasons that steer what the receiver does; any other text is only said."""

    RECONNECT = "reconnect"  # scheduler -> a peer it does not know: say HELLO again
    RETIRING = "retiring"  # supervisor: drain my host; scheduler -> worker: finish up
    INITIALIZER_FAILED = "initializer failed"  # worker: its initializer raised (detail)
    SHUTDOWN = "shutdown"  # pool -> its worker: stop
    STOPPED = "stopped"  # a worker or supervisor that stopped as asked
    DONE = "done"  # a client closing

    __str__ = str.__str__
    __format__ = str.__format__  # type: ignore[assignment]


def bye_text(reason: ByeReason, detail: str = "") -> str:
    """A BYE body's text: the reason, then the detail (a traceback) after a newline."""
    return f"{reason.value}:\n{detail}" if detail else reason.value


def bye_reason(text: str) -> ByeReason | None:
    """The steering reason of a BYE body's text; None for free text."""
    head = text.split(":\n", 1)[0]
    try:
        return ByeReason(head)
    except ValueError:
        return None


class Status(enum.IntEnum):
    """How a task ended, in a ResultEntry."""

    OK = 0  # payload: pickled return value
    ERROR = 1  # payload: pickled (exception, formatted traceback)
    LOST = 2  # payload: utf-8 message; the worker died under the task
    REJECTED = 3  # payload: utf-8 message; the scheduler refused the task
    CANCELLED = 4  # no payload; the scheduler dropped the queued task when asked
    TIMED_OUT = 5  # payload: utf-8 message; it ran past its time limit and was stopped
    STOPPED = 6  # payload: utf-8 message; Executor.stop stopped it while it ran


class TaskEntry(NamedTuple):
    """One task in a TASKS batch. ``fn_frames`` is 1 when the function blob rides
    along (the receiver did not have ``fn_key`` yet), else 0."""

    task_id: int
    fn_key: bytes
    fn_frames: int
    arg_frames: int

    @property
    def nframes(self) -> int:
        return self.fn_frames + self.arg_frames


class ResultEntry(NamedTuple):
    task_id: int
    status: int
    nframes: int
    duration: float  # seconds the task ran, for the dispatcher's prefetch estimate


class Message(NamedTuple):
    kind: Kind
    body: list[Any]
    frames: list[Any]  # payload frames (bytes, memoryview or zmq.Frame)


# One msgpack Packer per thread: msgpack.packb builds a new one (and its buffer) on
# every call, which costs more than packing a small header.
_packers = threading.local()


class SendableTask(Protocol):
    """What ``encode_tasks`` reads of a task (the pool's, the scheduler's and the
    remote client's tasks all have it)."""

    task_id: int
    fn_key: bytes
    fn_blob: Any
    frames: list[Any]


def encode_tasks(tasks: Iterable[SendableTask], needs: Callable[[bytes], bool], *,
                 with_options: bool = False) -> list[Any]:
    """The TASKS message for ``tasks``: a function's blob rides along only where
    ``needs(fn_key)`` says the receiver does not hold it yet. ``with_options`` (a
    client to its scheduler): each task's ``options`` (task_control.TaskOptions), for
    those that have some, as a second body item of TaskLimits entries."""
    entries: list[list[Any]] = []
    frames: list[Any] = []
    limits: list[list[Any]] = []
    for task in tasks:
        with_fn = needs(task.fn_key)
        entries.append([task.task_id, task.fn_key, int(with_fn), len(task.frames)])
        if with_fn:
            frames.append(task.fn_blob)
        frames.extend(task.frames)
        if with_options:
            options = getattr(task, "options", None)
            if options is not None:
                limits.append([task.task_id, options.timeout, options.grace, options.retries,
                               options.priority])
    return encode(Kind.TASKS, [entries, limits] if limits else [entries], frames)


class TaskLimits(NamedTuple):
    """Per-task options a client gave (``Executor.options``), in a TASKS body."""

    task_id: int
    timeout: float | None
    grace: float | None
    retries: int | None
    priority: int


_Entry = TypeVar("_Entry", TaskEntry, ResultEntry)


def with_frames(entries: Iterable[_Entry], frames: list[Any]) -> Iterator[tuple[_Entry, list[Any]]]:
    """Each entry of a decoded TASKS or RESULTS batch with its own payload frames
    (``decode`` has checked that the counts add up)."""
    pos = 0
    for entry in entries:
        end = pos + entry.nframes
        yield entry, frames[pos:end]
        pos = end


def encode(kind: Kind, body: Sequence[Any] = (), frames: Sequence[Any] = ()) -> list[Any]:
    """The frames of a message: the header, then the payload frames unchanged."""
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer().pack
    # A tuple body packs as the same msgpack array as a list.
    header = pack([PROTOCOL_VERSION, int(kind), body])
    return [header, *frames] if frames else [header]


# Plain ints: pyzmq's own multipart helpers combine IntFlag members on every frame,
# which costs more than the send itself for small messages.
_SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def readable(sock: zmq.Socket) -> bool:
    """Whether a whole message is waiting (cheaper than a NOBLOCK recv raising Again)."""
    return bool(sock.get(_EVENTS) & _POLLIN)  # type: ignore[operator]  # an int for EVENTS


# Below this, copying a bytes frame into the message costs less than wrapping it
# in a zmq.Frame for a zero-copy send.
_COPY_BELOW = 16 * 1024


# The backend's send, without the sugar layer's keyword handling (routing_id, group:
# unused here), which costs more than the send of a small frame itself.
_send = zmq.backend.Socket.send


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send one multipart message; large frames go without a copy."""
    send = _send
    more = _SNDMORE | flags
    for frame in frames[:-1]:
        send(sock, frame, more, type(frame) is bytes and len(frame) < _COPY_BELOW, False)
    frame = frames[-1]
    send(sock, frame, flags, type(frame) is bytes and len(frame) < _COPY_BELOW, False)


def send_routed(sock: zmq.Socket, peer: bytes, frames: Sequence[Any]) -> None:
    """A ROUTER's message to ``peer``: ``send_frames(sock, [peer, *frames])``
    without building that list, and a one-frame message without the loop."""
    _send(sock, peer, _SNDMORE, True, False)
    if len(frames) == 1:
        frame = frames[0]
        _send(sock, frame, 0, type(frame) is bytes and len(frame) < _COPY_BELOW, False)
    else:
        send_frames(sock, frames)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[Any]:
    """Receive one whole multipart message as zmq.Frames (no copies: payloads may be
    large buffers). With ``NOBLOCK``, raises zmq.Again when nothing is waiting."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(0, copy=False)
        frames.append(frame)
    return frames


_Frame = zmq.Frame
_new_tuple = tuple.__new__  # builds the records below without their Python-level __new__


def decode(frames: Sequence[Any]) -> Message:
    """Parse and validate a message; raise ``ProtocolError`` if it is not one."""
    if not frames:
        raise ProtocolError("empty message")
    head = frames[0]
    if len(head) > MAX_HEADER_BYTES:  # before a zmq.Frame is copied out
        raise ProtocolError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    if type(head) is not bytes:
        # A small copy: cheaper than the memoryview a zmq.Frame's .buffer makes.
        head = head.bytes if isinstance(head, _Frame) else bytes(head)
    # (Each check below is spelled out in one place: decode runs for every message,
    # and on a thread pool's round trip its cost is a measurable part of the total.)
    try:
        # msgpack >= 1.0 defaults: str as str, map keys str or bytes only, and no
        # length in the data may exceed the buffer's own.
        header = _unpackb(head)
    except Exception as exc:
        raise ProtocolError(f"header is not msgpack: {exc}") from None
    if type(header) is not list or len(header) != 3:
        raise ProtocolError("header is not [version, kind, body]")
    version, kind, body = header
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    known = _KINDS.get(kind) if type(kind) is int else None
    if known is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    kind, check = known
    if type(body) is not list:
        raise ProtocolError(f"{kind.name} body is not a list")
    payload = frames[1:] if type(frames) is list else list(frames[1:])
    return _new_tuple(Message, (kind, check(body, len(payload)), payload))


_unpackb = msgpack.unpackb


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ProtocolError(f"{what} is not a non-negative integer: {value!r}")
    return value


def _entries(body: list[Any], what: str) -> list[Any]:
    if len(body) != 1 or type(body[0]) is not list:  # msgpack arrays decode as lists
        raise ProtocolError(f"{what} body is not [[entries...]]")
    return body[0]


def _check_tasks(body: list[Any], nframes: int) -> list[Any]:
    entries = []
    total = 0
    limits = _check_limits(body.pop()) if len(body) == 2 else None
    for raw in _entries(body, "TASKS"):
        if type(raw) is not list or len(raw) != 4:
            raise ProtocolError(f"bad task entry {raw!r:.80}")
        task_id, fn_key, fn_frames, arg_frames = raw
        if type(fn_key) is not bytes or not 0 < len(fn_key) <= 64:
            raise ProtocolError("task fn_key is not 1..64 bytes")
        if type(fn_frames) is not int or fn_frames not in (0, 1):
            raise ProtocolError("task fn_frames is not 0 or 1")
        if type(task_id) is not int or task_id < 0 or type(arg_frames) is not int or arg_frames < 0:
            raise ProtocolError(f"bad task id or frame count in {raw!r:.80}")
        total += fn_frames + arg_frames
        entries.append(_new_tuple(TaskEntry, raw))
    if total != nframes:
        raise ProtocolError(f"TASKS header counts {total} frames, message has {nframes}")
    return [entries] if limits is None else [entries, limits]


def _seconds_or_none(value: Any, what: str, *, zero_ok: bool) -> float | None:
    if value is None:
        return None
    if (type(value) is not float and type(value) is not int) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero_ok) or value > MAX_SECONDS:
        raise ProtocolError(f"{what} is not a number of seconds in range: {value!r:.40}")
    return float(value)


def _check_limits(raw_limits: Any) -> dict[int, TaskLimits]:
    """The TaskLimits of a TASKS body, by task id."""
    if type(raw_limits) is not list:
        raise ProtocolError("TASKS limits are not a list")
    limits: dict[int, TaskLimits] = {}
    for raw in raw_limits:
        if type(raw) is not list or len(raw) != 5:
            raise ProtocolError(f"bad task limits {raw!r:.80}")
        task_id = _int(raw[0], "task id")
        retries, priority = raw[3], raw[4]
        if type(priority) is not int or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise ProtocolError(f"task priority out of range: {priority!r:.40}")
        if retries is not None and (type(retries) is not int or not 0 <= retries <= MAX_RETRIES):
            raise ProtocolError(f"task retries out of range: {retries!r:.40}")
        limits[task_id] = TaskLimits(task_id, _seconds_or_none(raw[1], "timeout", zero_ok=False),
                                     _seconds_or_none(raw[2], "grace", zero_ok=True), retries,
                                     priority)
    return limits


def _check_stop(body: list[Any], nframes: int) -> list[Any]:
    if len(body) != 2 or type(body[0]) is not list:
        raise ProtocolError("STOP body is not [[task ids], grace]")
    ids = [_int(t, "task id") for t in body[0]]
    grace = _seconds_or_none(body[1], "grace", zero_ok=True)
    _no_frames("STOP", nframes)
    return [ids, 0.0 if grace is None else grace]


def _check_interrupt(body: list[Any], nframes: int) -> list[Any]:
    if len(body) != 3 or type(body[0]) is not bytes or type(body[2]) is not bool:
        raise ProtocolError("INTERRUPT body is not [worker id, task id, kill]")
    _no_frames("INTERRUPT", nframes)
    return [body[0], _int(body[1], "task id"), body[2]]


def _check_results(body: list[Any], nframes: int) -> list[Any]:
    entries = []
    total = 0
    for raw in _entries(body, "RESULTS"):
        if type(raw) is not list or len(raw) != 4:
            raise ProtocolError(f"bad result entry {raw!r:.80}")
        task_id, status, count, duration = raw
        if type(status) is not int or status not in _STATUSES:
            raise ProtocolError(f"unknown result status {status!r}")
        if (type(duration) is not float and type(duration) is not int) or not math.isfinite(duration):
            # NaN or infinity would poison the run-time estimates (the scheduler died of it).
            raise ProtocolError(f"result duration {duration!r} is not a finite number")
        if type(task_id) is not int or task_id < 0 or type(count) is not int or count < 0:
            raise ProtocolError(f"bad task id or frame count in {raw!r:.80}")
        total += count
        if type(duration) is int:
            raw[3] = float(duration)
        entries.append(_new_tuple(ResultEntry, raw))
    if total != nframes:
        raise ProtocolError(f"RESULTS header counts {total} frames, message has {nframes}")
    return [entries]


def _check_cancel(body: list[Any], nframes: int) -> list[Any]:
    ids = [_int(t, "task id") for t in _entries(body, "CANCEL")]
    _no_frames("CANCEL", nframes)
    return [ids]


def _check_info(body: list[Any], nframes: int) -> list[Any]:
    if len(body) != 1 or not isinstance(body[0], dict):
        raise ProtocolError("body is not [info-map]")
    _no_frames("info message", nframes)
    return body


class Hello(NamedTuple):
    """HELLO: a peer introduces itself. ``info`` is the whole map: the versions
    (``version_conflicts``) and what STATUS shows of the peer."""

    role: Any  # a PeerRole's word; the scheduler answers any other with REFUSE
    pid: int | None
    slots: int  # tasks a worker runs at once
    heartbeat: float | None  # the peer's heartbeat interval, s
    retries: int  # a client's retries for a task whose worker died
    seq: int | None  # which HELLO this is: a WELCOME names the one it answers
    supervisor: bytes  # a daemon's worker: the identity of its `farpool worker`
    name: str | None  # a `farpool worker`'s host name
    info: dict[str, Any]
    # A supervisor's worker processes that outlived a scheduler: (worker id, the task
    # it runs or None), for the scheduler to take them back (see rejoin.py).
    running: list[tuple[bytes, int | None]] = []


class Welcome(NamedTuple):
    """WELCOME: the scheduler's answer to a client's or a supervisor's HELLO."""

    session: str  # a new one each time the scheduler starts
    heartbeat: float
    liveness: int
    seq: int | None  # the HELLO answered
    info: dict[str, Any]


class Lost(NamedTuple):
    """LOST: a supervisor tells that one of its worker processes died."""

    worker: bytes
    how: str  # "exit code 3", "signal SIGKILL", ...
    running: int | None  # its state record: the task it had begun, if any
    done: int | None  # and the last it finished


def _field(info: dict[str, Any], key: str, types: tuple[type, ...], default: Any,
           what: str) -> Any:
    value = info.get(key, default)
    if value is default or type(value) in types:
        return value
    raise ProtocolError(f"{what} {key} is {value!r}")


# What a HELLO may ask for: a peer that holds a valid key must not claim the whole
# queue (slots), rerun a task without end (retries), or outlive every deadline.
MAX_SLOTS = 1024
MAX_RETRIES = 100
# The longest time limit or grace the wire takes (about 115 days).
MAX_SECONDS = 1e7
MAX_PRIORITY = 10**6  # a task's priority: -MAX_PRIORITY to MAX_PRIORITY
MAX_HEARTBEAT = 3600.0
MAX_NAME = 255


def _check_hello(body: list[Any], nframes: int) -> list[Any]:
    info = _check_info(body, nframes)[0]
    slots = _field(info, "slots", (int,), 1, "HELLO")
    retries = _field(info, "retries", (int,), 0, "HELLO")
    if not 1 <= slots <= MAX_SLOTS or not 0 <= retries <= MAX_RETRIES:
        raise ProtocolError(f"HELLO slots {slots!r} / retries {retries!r} out of range")
    beat = _field(info, "heartbeat", (int, float), None, "HELLO")
    if beat is not None and not 0 < beat <= MAX_HEARTBEAT:
        raise ProtocolError(f"HELLO heartbeat is {beat!r}")
    name = _field(info, "name", (str,), None, "HELLO")
    if name is not None and len(name) > MAX_NAME:
        raise ProtocolError(f"HELLO name is {len(name)} characters long (at most {MAX_NAME})")
    return [Hello(role=info.get("role"), pid=_field(info, "pid", (int,), None, "HELLO"),
                  slots=slots, heartbeat=None if beat is None else float(beat), retries=retries,
                  seq=_field(info, "hello", (int,), None, "HELLO"),
                  supervisor=_field(info, "supervisor", (bytes,), b"", "HELLO"),
                  name=name, info=info, running=_check_running(info.pop("running", None)))]


def _check_running(running: Any) -> list[tuple[bytes, int | None]]:
    if running is None:
        return []
    if not isinstance(running, list) or len(running) > MAX_SLOTS:
        raise ProtocolError(f"HELLO running is not a list of at most {MAX_SLOTS} entries")
    checked: list[tuple[bytes, int | None]] = []
    for item in running:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], bytes)
                or not 0 < len(item[0]) <= 255
                or not (item[1] is None or (type(item[1]) is int and 0 < item[1] < 2 ** 64))):
            raise ProtocolError(f"HELLO running has a bad entry {item!r:.80}")
        checked.append((item[0], item[1]))
    return checked


def _check_welcome(body: list[Any], nframes: int) -> list[Any]:
    info = _check_info(body, nframes)[0]
    session = _field(info, "session", (str,), None, "WELCOME")
    beat = _field(info, "heartbeat", (int, float), None, "WELCOME")
    liveness = _field(info, "liveness", (int,), None, "WELCOME")
    if session is None or beat is None or liveness is None or not beat > 0 or liveness < 1:
        raise ProtocolError(f"WELCOME needs a session, a heartbeat and a liveness: {info!r}")
    return [Welcome(session, float(beat), liveness,
                    _field(info, "hello", (int,), None, "WELCOME"), info)]


def _check_lost(body: list[Any], nframes: int) -> list[Any]:
    info = _check_info(body, nframes)[0]
    worker = _field(info, "worker", (bytes,), None, "LOST")
    how = _field(info, "how", (str,), None, "LOST")
    if worker is None or how is None:
        raise ProtocolError("LOST needs worker (bytes) and how (str)")
    running = _field(info, "running", (int,), None, "LOST")
    done = _field(info, "done", (int,), None, "LOST")
    return [Lost(worker, how, running, done)]


def _check_reason(body: list[Any], nframes: int) -> list[Any]:
    if len(body) != 1 or not isinstance(body[0], str):
        raise ProtocolError("body is not [reason]")
    _no_frames("message", nframes)
    return body


def _check_empty(body: list[Any], nframes: int) -> list[Any]:
    if body:
        raise ProtocolError("body should be empty")
    _no_frames("message", nframes)
    return body


def _no_frames(what: str, nframes: int) -> None:
    if nframes:
        raise ProtocolError(f"{what} carries {nframes} unexpected frames")


_VALIDATORS = {
    Kind.HELLO: _check_hello,
    Kind.WELCOME: _check_welcome,
    Kind.REFUSE: _check_reason,
    Kind.TASKS: _check_tasks,
    Kind.RESULTS: _check_results,
    Kind.CANCEL: _check_cancel,
    Kind.HEARTBEAT: _check_empty,
    Kind.BYE: _check_reason,
    Kind.STATUS: _check_empty,
    Kind.STATUS_REPLY: _check_info,
    Kind.LOST: _check_lost,
    Kind.STOP: _check_stop,
    Kind.INTERRUPT: _check_interrupt,
}


# Kind number -> (Kind, its body's validator).
_KINDS = {int(k): (k, check) for k, check in _VALIDATORS.items()}
_STATUSES = frozenset(int(s) for s in Status)


def version_info() -> dict[str, str]:
    """What a peer must share with us to read our payloads."""
    from . import __version__

    return {
        "farpool": __version__,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "cloudpickle": _cloudpickle_version(),
        "protocol": str(PROTOCOL_VERSION),
    }


def _cloudpickle_version() -> str:
    # From the installed package's metadata: the scheduler, which must never unpickle,
    # compares versions without importing cloudpickle.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cloudpickle")
    except PackageNotFoundError:  # run from a source tree: only the module knows
        import cloudpickle

        return str(cloudpickle.__version__)


def version_conflicts(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Human-readable differences that make payloads unreadable; empty if compatible.

    farpool and cloudpickle are compared on major.minor (patch releases keep the
    pickle format), Python on its minor version (bytecode in pickled functions)."""
    problems = []
    for key in ("protocol", "farpool", "python", "cloudpickle"):
        mine, other = str(ours.get(key)), str(theirs.get(key))
        if _release(mine) != _release(other):
            # Read by both sides (the refused peer, the scheduler's log): no "here".
            problems.append(f"{key} {other} on the connecting side, {mine} on the scheduler")
    return problems


_ROLES = frozenset(role.value for role in PeerRole)


def hello_refusal(hello: Hello) -> str | None:
    """Why a scheduler refuses a HELLO whatever the key (versions that cannot read each
    other's payloads, a role that is none of the three), or None."""
    conflicts = version_conflicts(version_info(), hello.info)
    if conflicts:
        return "incompatible versions: " + "; ".join(conflicts)
    if not isinstance(hello.role, str) or hello.role not in _ROLES:
        return f"unknown role {hello.role!r}"
    return None


def _release(version: str) -> str:
    return ".".join(version.split(".")[:2])
