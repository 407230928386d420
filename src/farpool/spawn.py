"""Starting local worker processes and telling how they ended.

Each worker is a fresh interpreter (``python -c READ_BOOT farpool.worker_loop``, see
``worker_loop.boot``), started by fork+exec with nothing of ours inherited but one end
of a socket pair:

- the parent watches its end: end-of-file means the child died (however it died);
- the child watches its end: end-of-file means the parent died, and it exits.

A small shared state file records which task the worker is running, so after a
crash the parent knows exactly which task was the victim and which never started.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .worker_loop import STATE, STATE_FILE_SIZE, STOP, STOP_AT, STOP_SIGNAL

# A worker imports the few farpool modules it uses, not the package's __init__ (which
# imports the whole client): this line registers the package bare, and worker_loop.boot
# loads the real __init__ only if a task asks for something in it. The trailing
# argument names the process in ps.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_READ_BOOT = "import sys; exec(sys.stdin.buffer.readline())"
_BOOT = ("import sys, types; p = types.ModuleType('farpool'); p.__path__ = [{!r}]; "
         "sys.modules['farpool'] = p; import farpool.worker_loop as w; sys.exit(w.boot())")


@dataclass(eq=False)
class WorkerProcess:
    worker_id: bytes
    proc: subprocess.Popen[bytes]
    control: socket.socket
    state: mmap.mmap
    state_path: str
    started: float = field(default_factory=time.monotonic)
    said_hello: bool = False
    said_bye: str = ""
    # Readable once the process itself has exited (Linux's pidfd). The control socket's
    # end-of-file is not enough: a child the task forked inherits the worker's end and
    # keeps it open for as long as it lives. -1 where the OS has no pidfd.
    pidfd: int = -1
    rank: int = 0  # its place among its pool's processes (worker_identity)
    killed: bool = False  # killed on purpose (a stop's grace was over): no start failure

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        """What to poll for this process's death."""
        return self.pidfd if self.pidfd >= 0 else self.control.fileno()

    def running_and_done(self) -> tuple[int | None, int | None]:
        """Task ids (running, last finished) from the shared state; None if none."""
        running, done = STATE.unpack_from(self.state, 0)
        return (running - 1 if running else None), (done - 1 if done else None)

    def interrupt(self, task_id: int) -> None:
        """The soft stop: ask the worker to raise TaskInterrupted in ``task_id`` (now
        if it runs it, at its start if it has not begun; see worker_loop)."""
        STOP.pack_into(self.state, STOP_AT, task_id + 1)
        self.signal(STOP_SIGNAL)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to this process, by its pidfd where there is one (a pid
        can be reused once the process is reaped; a pidfd cannot)."""
        try:
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signum)
            elif self.proc.returncode is None:
                os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass  # it has exited: its death is on the way

    def reap(self, timeout: float = 5.0) -> int | None:
        """Wait for the process to end; its return code (negative: a signal)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, deadline: float) -> None:
        """Ask the OS to end the process: terminate, then kill after ``deadline``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            if self.reap(max(0.0, deadline - time.monotonic())) is None:
                self.proc.kill()
                self.reap(5.0)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.control.close()
        self.state.close()
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass


class InheritedFd:
    """A file descriptor a worker inherits at the same number (see ``pickle_initializer``);
    multiprocessing rebuilds its objects from it with ``detach``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


class _Spawning:
    """Stands for the process being started while initargs are pickled, as in
    multiprocessing's spawn start method: its objects (Queue, Lock, Event, Value...)
    then agree to be pickled, and the descriptors they need are collected."""

    DupFd = InheritedFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd


def pickle_initializer(initializer: Any, initargs: tuple[Any, ...], *,
                       main: bool = False) -> tuple[bytes, tuple[int, ...]]:
    """Pickle a pool's initializer and initargs for its worker processes.

    As with the stdlib's pools started by spawn or forkserver, initargs may hold
    multiprocessing objects made for those start methods (a Queue for logging, a Lock):
    they are pickled the way multiprocessing hands them to a new process, and the file
    descriptors returned must be inherited by every worker. Objects made for a fork
    context cannot reach a fresh interpreter: multiprocessing says so in the error.
    """
    import io
    from collections import ChainMap
    from multiprocessing import context
    from multiprocessing.reduction import ForkingPickler

    from .serialize import pickler

    TaskPickler = pickler(main)

    class Pickler(TaskPickler):  # type: ignore[valid-type,misc]
        # Ours first; multiprocessing's for what it adds (connections, shared memory
        # arenas, sockets).
        dispatch_table = ChainMap(TaskPickler.dispatch_table,
                                  ForkingPickler(io.BytesIO()).dispatch_table)

    spawning = _Spawning()
    buf = io.BytesIO()
    # A stand-in for the Popen, which collects the fds the pickling hands it.
    context.set_spawning_popen(spawning)  # type: ignore[arg-type]
    try:
        Pickler(buf, protocol=5).dump((initializer, initargs))
    finally:
        context.set_spawning_popen(None)
    return buf.getvalue(), tuple(dict.fromkeys(spawning.fds))


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"signal {name}"
    return f"exit code {returncode}"


def free_rank(procs: Iterable[WorkerProcess]) -> int:
    """The lowest rank no live process holds: a replacement takes the dead one's."""
    taken = {proc.rank for proc in procs}
    return next(rank for rank in itertools.count() if rank not in taken)


def spawn_worker(worker_id: bytes, address: str, runtime_dir: str, *,
                 initializer: Any = None, initargs: tuple[Any, ...] = (),
                 max_tasks: int | None = None, init_blob: bytes | None = None,
                 inherit_fds: tuple[int, ...] = (),
                 extra: dict[str, Any] | None = None, rank: int = 0) -> WorkerProcess:
    """Start one worker process that connects to ``address`` as ``worker_id``.

    ``init_blob`` and ``inherit_fds`` come from ``pickle_initializer`` (made here from
    ``initializer`` and ``initargs`` when not given). ``extra`` adds to the worker's
    configuration (a daemon's worker: "network" for keys and heartbeats, "hello" for
    what its HELLO says)."""
    state_path = os.path.join(runtime_dir, f"{worker_id.decode()}.state")
    with open(state_path, "wb") as f:
        f.write(b"\0" * STATE_FILE_SIZE)
    with open(state_path, "r+b") as f:
        state = mmap.mmap(f.fileno(), STATE_FILE_SIZE)
    ours, theirs = socket.socketpair()
    if init_blob is None:
        init_blob, inherit_fds = pickle_initializer(initializer, initargs)
    from . import __version__
    config = {
        "worker_id": worker_id,
        "address": address,
        "control_fd": theirs.fileno(),
        "state_path": state_path,
        "sys_path": [p for p in sys.path if p],
        "initializer": init_blob,
        "max_tasks": max_tasks,
        "version": __version__,
        # As multiprocessing gives its children: Manager proxies passed to a task or
        # an initializer connect back to their manager with this key.
        "authkey": bytes(multiprocessing.current_process().authkey),
        "rank": rank,
        **(extra or {}),
    }
    try:
        proc = subprocess.Popen(
            # The boot line comes first on stdin: `ps` shows a short command, not it.
            [sys.executable, "-c", _READ_BOOT, "farpool.worker_loop"],
            stdin=subprocess.PIPE,
            pass_fds=(theirs.fileno(), *inherit_fds),
            close_fds=True,
        )
    finally:
        theirs.close()
    assert proc.stdin is not None
    try:
        proc.stdin.write(_BOOT.format(_PACKAGE_DIR).encode() + b"\n")
        proc.stdin.write(pickle.dumps(config, protocol=5))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # died at once; its control socket reports that
    return WorkerProcess(worker_id, proc, ours, state, state_path, pidfd=_open_pidfd(proc.pid),
                         rank=rank)


def _open_pidfd(pid: int) -> int:
    """A pidfd for ``pid``, or -1 where the OS cannot give one (then the control
    socket's end-of-file tells of the death)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return -1
    try:
        return int(pidfd_open(pid))
    except OSError:
        return -1
