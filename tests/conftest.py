"""Shared fixtures: one executor fixture parametrized over every backend, and leak
checks for threads and child processes."""

from __future__ import annotations

import os
import threading
import time

import pytest

import farpool

# Every backend the contract suite runs against. A name listed in CLUSTER_BACKENDS
# gets its address from the session fixture "<name>_cluster", which starts (once per
# session) what the backend needs and yields the address to use.
LOCAL_BACKENDS = ["processes", "threads", "inline"]
CLUSTER_BACKENDS: list[str] = []
ALL_BACKENDS = LOCAL_BACKENDS + CLUSTER_BACKENDS


def _engine_available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _children() -> set[int]:
    """Pids of this process's live children (Linux /proc)."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Every test leaves no farpool thread and no child process behind."""
    before_threads = {t.ident for t in threading.enumerate()}
    before_children = _children()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + 10
    while True:
        threads = [t for t in threading.enumerate()
                   if t.ident not in before_threads and t.is_alive()
                   and (t.name.startswith("farpool") or t.name.startswith("Farpool"))]
        children = _children() - before_children
        if not threads and not children:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leaked threads {[t.name for t in threads]} / child pids {children}")
        time.sleep(0.05)


@pytest.fixture(params=ALL_BACKENDS)
def address(request):
    name = request.param
    if name in CLUSTER_BACKENDS:
        return request.getfixturevalue(f"{name}_cluster")
    return name


@pytest.fixture
def executor(address):
    ex = farpool.Executor(address, max_workers=2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
