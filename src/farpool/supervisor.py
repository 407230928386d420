"""Starting local worker processes and telling how they ended.

Each worker is a fresh interpreter (``python -c BOOT farpool.worker``, see
``worker.boot``), started by fork+exec with nothing of ours inherited but one end
of a socket pair:

- the parent watches its end: end-of-file means the child died (however it died);
- the child watches its end: end-of-file means the parent died, and it exits.

A small shared state file records which task the worker is running, so after a
crash the parent knows exactly which task was the victim and which never started.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .worker import STATE

# A worker imports the few farpool modules it uses, not the package's __init__ (which
# imports the whole client): this line registers the package bare, and worker.boot
# loads the real __init__ only if a task asks for something in it. The trailing
# argument names the process in ps.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_BOOT = ("import sys, types; p = types.ModuleType('farpool'); p.__path__ = [{!r}]; "
         "sys.modules['farpool'] = p; import farpool.worker as w; sys.exit(w.boot())")


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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        return self.control.fileno()

    def running_and_done(self) -> tuple[int | None, int | None]:
        """Task ids (running, last finished) from the shared state; None if none."""
        running, done = STATE.unpack_from(self.state, 0)
        return (running - 1 if running else None), (done - 1 if done else None)

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
        self.control.close()
        self.state.close()
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass


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


def spawn_worker(worker_id: bytes, address: str, runtime_dir: str, *,
                 initializer: Any = None, initargs: tuple[Any, ...] = (),
                 max_tasks: int | None = None, init_blob: bytes | None = None,
                 extra: dict[str, Any] | None = None) -> WorkerProcess:
    """Start one worker process that connects to ``address`` as ``worker_id``.

    ``extra`` adds to the worker's configuration (a daemon's worker: "network" for
    keys and heartbeats, "hello" for what its HELLO says)."""
    state_path = os.path.join(runtime_dir, f"{worker_id.decode()}.state")
    with open(state_path, "wb") as f:
        f.write(b"\0" * STATE.size)
    with open(state_path, "r+b") as f:
        state = mmap.mmap(f.fileno(), STATE.size)
    ours, theirs = socket.socketpair()
    if init_blob is None:
        import cloudpickle

        init_blob = cloudpickle.dumps((initializer, initargs))
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
        **(extra or {}),
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT.format(_PACKAGE_DIR), "farpool.worker"],
            stdin=subprocess.PIPE,
            pass_fds=(theirs.fileno(),),
            close_fds=True,
        )
    finally:
        theirs.close()
    assert proc.stdin is not None
    try:
        proc.stdin.write(pickle.dumps(config, protocol=5))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # died at once; its control socket reports that
    return WorkerProcess(worker_id, proc, ours, state, state_path)
