"""Shared fixtures: one executor fixture parametrized over every backend, and leak
checks for threads and child processes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

import farpool
from farpool.security import keygen, load_key_file

# Every backend the contract suite runs against. A name listed in CLUSTER_BACKENDS
# gets its address from the session fixture "<name>_cluster", which starts (once per
# session) what the backend needs and yields the address to use.
LOCAL_BACKENDS = ["processes", "threads", "inline"]
# "tcp": farpool's own scheduler and worker daemons, on loopback with CURVE keys;
# "ipc": the same daemons on a unix socket in a private directory.
CLUSTER_BACKENDS: list[str] = ["tcp", "ipc"]
# Dask and Ray join when installed (found without importing them, which is slow).
CLUSTER_BACKENDS += [name for name, module in (("dask", "distributed"), ("ray", "ray"))
                     if importlib.util.find_spec(module) is not None]
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


@pytest.fixture(scope="session")
def key_dir():
    """A private farpool key directory for the session, used by every daemon and client
    the tests start (through $FARPOOL_KEY_DIR), and removed at the end."""
    path = tempfile.mkdtemp(prefix="farpool-keys-")
    old = os.environ.get("FARPOOL_KEY_DIR")
    os.environ["FARPOOL_KEY_DIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("FARPOOL_KEY_DIR", None)
        else:
            os.environ["FARPOOL_KEY_DIR"] = old
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tcp_cluster(key_dir, tmp_path_factory):
    """Address of a farpool scheduler with one worker daemon (2 processes), shared by
    the session's contract tests. Fault tests start clusters of their own."""
    from remote_cluster import start_session_cluster

    keeper = start_session_cluster(tmp_path_factory.mktemp("farpool") / "cluster.log")
    try:
        yield keeper.line
    finally:
        keeper.stop()


@pytest.fixture(scope="session")
def ipc_cluster(key_dir, tmp_path_factory):
    """The same daemons as tcp_cluster, on ``ipc://`` in a private (0700) directory."""
    from remote_cluster import start_session_cluster

    run_dir = tempfile.mkdtemp(prefix="farpool-ipc-")  # short: unix socket paths are limited
    keeper = start_session_cluster(tmp_path_factory.mktemp("farpool-ipc") / "cluster.log",
                                   bind=f"ipc://{run_dir}/scheduler")
    try:
        yield keeper.line
    finally:
        keeper.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


# -- Dask and Ray clusters (once per session, 2 workers; see engine_clusters.py) --------


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """Address of a running Dask cluster: ``dask://127.0.0.1:PORT``."""
    pytest.importorskip("distributed")
    from engine_clusters import start_dask

    keeper = start_dask(tmp_path_factory.mktemp("dask") / "cluster.log")
    try:
        yield "dask://" + keeper.line.split("://", 1)[1]
    finally:
        keeper.stop()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A running Ray cluster: ``(gcs_address, "ray://127.0.0.1:PORT", env)``, where
    ``env`` holds the session's auth token, needed to connect."""
    if importlib.util.find_spec("ray") is None:  # not imported yet: see ray_cluster
        pytest.skip("ray is not installed")
    from engine_clusters import start_ray

    keeper = start_ray(tmp_path_factory.mktemp("ray") / "cluster.log")
    try:
        gcs, client = keeper.line.split()
        yield gcs, client, keeper.env
    finally:
        keeper.stop()


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """The address ``"ray"``, with this process connected to the session's cluster.

    Ray allows one connection per process and a Ray Client connection takes seconds
    to set up, so rather than a ``ray://`` address per executor, the session connects
    once as a driver and the ``"ray"`` address uses that connection (an executor
    never shuts down a Ray it did not start). ``ray://`` is tested in test_engines.
    """
    gcs, _, env = ray_head
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            mp.setenv(name, env[name])
        import ray  # after the token is set: Ray reads its auth settings on import

        ray.init(address=gcs, log_to_driver=False)
        try:
            yield "ray"
        finally:
            ray.shutdown()


@pytest.fixture
def daemons(key_dir, tmp_path):
    """A list the test appends daemons to; each is stopped after the test."""
    started = []
    yield started
    for daemon in reversed(started):
        daemon.stop()


@pytest.fixture
def issue(key_dir):
    """``issue(role)``: a key of that role, as `farpool keygen --role` makes it;
    removed (authorized and issued files) after the test."""
    made: list[Path] = []

    def make(role: str) -> tuple[Path, tuple[bytes, object]]:
        path = keygen(key_dir, name=f"test-{role}", role=role)
        made.append(path)
        return path, load_key_file(path)

    yield make
    for path in made:
        name = path.name[: -len(".cluster-key")]
        Path(key_dir, "authorized", f"{name}.key").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
