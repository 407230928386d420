#!/usr/bin/env python
"""farpool's backends next to the stdlib pools, loky, Dask and Ray, in one run.

    python scripts/bench.py                  # every row and metric (a few minutes)
    python scripts/bench.py --quick          # fewer repeats: a smoke test
    python scripts/bench.py --only farpool-processes,stdlib-processes --metrics latency,submit
    python scripts/bench.py --json out.json  # raw numbers too

Prints Markdown tables on stdout (progress goes to stderr): the median of each metric
per executor, and in brackets how many times better than the stdlib
``ProcessPoolExecutor`` (fork context) in the same run. Every executor has the same
number of workers (``--workers``, default 2). A row whose package is missing, or
that fails to start, is skipped with a note.

Executors of one group are measured in turns (repeat 1 of each, then repeat 2 of
each...), so a load spike on a shared machine hits them alike; the adapter overhead
of farpool on Dask and Ray is measured against the same running cluster.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import gc
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# How long one burst of tasks may take before the row is marked as failed.
TASK_TIMEOUT = 300.0
# How long the tcp daemons, a Dask cluster or Ray may take to give a first result.
START_TIMEOUT = 60.0
# How long closing one executor may take before it is left behind (noted).
CLOSE_TIMEOUT = 60.0
ECHO_BYTES = 100_000_000
SLEEP_SECONDS = 0.001
# Dask and Ray rows (native and through farpool alike) run bursts this much smaller:
# at about a millisecond per task, full bursts would take most of the run.
ENGINE_TASK_SCALE = 0.1
ENGINE_SLEEP_SCALE = 0.5


# -- the tasks (module level: the stdlib pool pickles functions by reference) -----------


def noop() -> None:
    return None


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def sleep_1ms(_: int) -> None:
    time.sleep(SLEEP_SECONDS)


# -- metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str  # for --metrics and the JSON file
    header: str  # the table's column
    unit_scale: float  # raw value (seconds or per second) -> shown unit
    lower_is_better: bool


METRICS = {m.name: m for m in [
    Metric("latency", "round trip (µs)", 1e6, True),
    Metric("submit", "no-op submit (tasks/s)", 1.0, False),
    Metric("map", "map (items/s)", 1.0, False),
    Metric("echo", "100 MB echo (s)", 1.0, True),
    Metric("startup", "start-up to 1st result (ms)", 1e3, True),
    Metric("sleep", "1 ms tasks (tasks/s)", 1.0, False),
]}


@dataclass
class Config:
    workers: int
    latency_calls: int  # sequential round trips per repeat
    latency_repeats: int
    latency_budget: float  # seconds per row, over all its repeats
    tasks: int  # no-op submit and map: tasks per burst
    sleep_tasks: int  # 1 ms tasks per burst
    repeats: int  # bursts, echoes and start-ups per row
    budget: float  # seconds per row and metric; at least one repeat is always made

    @classmethod
    def make(cls, quick: bool, workers: int) -> Config:
        if quick:
            return cls(workers, latency_calls=100, latency_repeats=1, latency_budget=1.0,
                       tasks=1000, sleep_tasks=200, repeats=1, budget=2.0)
        return cls(workers, latency_calls=500, latency_repeats=4, latency_budget=3.0,
                   tasks=10_000, sleep_tasks=1000, repeats=5, budget=8.0)


# -- rows: one executor each ----------------------------------------------------------------


class Row:
    """One executor under test. Subclasses give the calls; ``open`` and ``close``
    bracket the long-lived instance used by every metric but ``startup``."""

    #: Dask and Ray take fewer tasks per burst (their per-task cost is about a millisecond).
    task_scale = 1.0
    sleep_scale = 1.0
    metrics: frozenset[str] = frozenset(METRICS)

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        self.description = description

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def one(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Submit one call and wait for its result."""
        raise NotImplementedError

    def many(self, fn: Callable[..., Any], n: int, indexed: bool = True) -> list[Any]:
        """Submit ``fn(i)`` (or ``fn()``) for i in range(n) one by one, then wait for them all."""
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], n: int) -> list[Any]:
        """The engine's map over range(n), default chunk size."""
        raise NotImplementedError

    def first_result(self) -> float:
        """Seconds from creating a fresh instance to its first result (closing excluded)."""
        raise NotImplementedError


def _wait_all(futures: list[cf.Future]) -> list[Any]:
    _done, not_done = cf.wait(futures, timeout=TASK_TIMEOUT)
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {len(futures)} tasks not done after {TASK_TIMEOUT} s")
    return [f.result() for f in futures]


class ExecutorRow(Row):
    """Anything with the ``concurrent.futures.Executor`` API, made by ``factory``."""

    def __init__(self, name: str, description: str, factory: Callable[[], cf.Executor], *,
                 metrics: frozenset[str] | None = None, task_scale: float = 1.0,
                 sleep_scale: float = 1.0) -> None:
        super().__init__(name, description)
        self.factory = factory
        self.task_scale = task_scale
        self.sleep_scale = sleep_scale
        if metrics is not None:
            self.metrics = metrics
        self.ex: cf.Executor | None = None

    def open(self) -> None:
        self.ex = self.factory()
        self.one(noop)  # the workers are up before anything is timed

    def close(self) -> None:
        if self.ex is not None:
            ex, self.ex = self.ex, None
            ex.shutdown(wait=True)

    def one(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args).result(TASK_TIMEOUT)

    def many(self, fn: Callable[..., Any], n: int, indexed: bool = True) -> list[Any]:
        submit = self.ex.submit
        if indexed:
            return _wait_all([submit(fn, i) for i in range(n)])
        return _wait_all([submit(fn) for _ in range(n)])

    def map(self, fn: Callable[..., Any], n: int) -> list[Any]:
        return list(self.ex.map(fn, range(n), timeout=TASK_TIMEOUT))

    def first_result(self) -> float:
        start = time.perf_counter()
        ex = self.factory()
        try:
            ex.submit(noop).result(START_TIMEOUT)
            return time.perf_counter() - start
        finally:
            ex.shutdown(wait=True)


class OptionsRow(ExecutorRow):
    """farpool with per-task options (``Executor.options``): the cost of a time limit.
    The view is what is timed; its executor is what ``close`` shuts down."""

    def __init__(self, name: str, description: str, factory: Callable[[], cf.Executor],
                 **options: Any) -> None:
        super().__init__(name, description, factory,
                         metrics=frozenset({"latency", "submit", "map", "sleep"}))
        self.options = options
        self.root: cf.Executor | None = None

    def open(self) -> None:
        self.root = self.factory()
        self.ex = self.root.options(**self.options)  # type: ignore[attr-defined]
        self.one(noop)

    def close(self) -> None:
        self.ex = None
        if self.root is not None:
            root, self.root = self.root, None
            root.shutdown(wait=True)


class DaskRow(Row):
    """Dask's own API on a running cluster: Client.submit / Client.map, then gather."""

    task_scale = ENGINE_TASK_SCALE
    sleep_scale = ENGINE_SLEEP_SCALE

    def __init__(self, name: str, description: str, scheduler: Callable[[], str]) -> None:
        super().__init__(name, description)
        self.scheduler = scheduler
        self.client: Any = None

    def _connect(self) -> Any:
        import distributed

        # As farpool's own "dask" backend does: results straight from the workers.
        return distributed.Client(self.scheduler(), set_as_default=False, direct_to_workers=True,
                                  timeout=START_TIMEOUT)

    def open(self) -> None:
        self.client = self._connect()
        self.one(noop)

    def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            client.close()

    def one(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result(TASK_TIMEOUT)

    def _gather(self, futures: list[Any]) -> list[Any]:
        import distributed

        with self.client.as_current():  # wait() uses the current client
            distributed.wait(futures, timeout=TASK_TIMEOUT)
        return self.client.gather(futures)

    def many(self, fn: Callable[..., Any], n: int, indexed: bool = True) -> list[Any]:
        submit = self.client.submit
        if indexed:
            return self._gather([submit(fn, i, pure=False) for i in range(n)])
        return self._gather([submit(fn, pure=False) for _ in range(n)])

    def map(self, fn: Callable[..., Any], n: int) -> list[Any]:
        return self._gather(self.client.map(fn, range(n), pure=False))

    def first_result(self) -> float:
        start = time.perf_counter()
        client = self._connect()
        try:
            client.submit(noop, pure=False).result(START_TIMEOUT)
            return time.perf_counter() - start
        finally:
            client.close()


class DaskStreamRow(DaskRow):
    """Dask's own API with each result fetched as its task ends, as a farpool future
    gets it: ``as_completed(with_results=True)``. For the 1 ms tasks only."""

    metrics = frozenset({"sleep"})

    def many(self, fn: Callable[..., Any], n: int, indexed: bool = True) -> list[Any]:
        import distributed

        submit = self.client.submit
        if indexed:
            futures = [submit(fn, i, pure=False) for i in range(n)]
        else:
            futures = [submit(fn, pure=False) for _ in range(n)]
        results = {}
        for future, value in distributed.as_completed(futures, with_results=True, loop=self.client.loop,
                                                      timeout=TASK_TIMEOUT):
            results[future.key] = value
        return [results[f.key] for f in futures]


class RayRow(Row):
    """Ray's own API: ``ray.remote`` functions (exported once), ``ray.get``."""

    task_scale = ENGINE_TASK_SCALE
    sleep_scale = ENGINE_SLEEP_SCALE

    def __init__(self, name: str, description: str) -> None:
        super().__init__(name, description)
        self.remotes: dict[Callable[..., Any], Any] = {}

    def _remote(self, fn: Callable[..., Any]) -> Any:
        import ray

        remote = self.remotes.get(fn)
        if remote is None:
            remote = self.remotes[fn] = ray.remote(fn)
        return remote

    def open(self) -> None:
        self.one(noop)

    def close(self) -> None:
        self.remotes.clear()

    def one(self, fn: Callable[..., Any], *args: Any) -> Any:
        import ray

        return ray.get(self._remote(fn).remote(*args), timeout=TASK_TIMEOUT)

    def many(self, fn: Callable[..., Any], n: int, indexed: bool = True) -> list[Any]:
        import ray

        remote = self._remote(fn).remote
        refs = [remote(i) for i in range(n)] if indexed else [remote() for _ in range(n)]
        return ray.get(refs, timeout=TASK_TIMEOUT)

    def map(self, fn: Callable[..., Any], n: int) -> list[Any]:
        return self.many(fn, n)  # Ray has no map of its own: a list of remote calls is the idiom

    def first_result(self) -> float:
        import ray

        # A new remote function, defined and called, on the running instance.
        start = time.perf_counter()
        return_value = ray.get(ray.remote(noop).remote(), timeout=START_TIMEOUT)
        assert return_value is None
        return time.perf_counter() - start


class RayFuturesRow(RayRow):
    """Ray's own API with each result delivered as its task ends, as a farpool future
    gets it: ``ObjectRef.future()``. For the 1 ms tasks only."""

    metrics = frozenset({"sleep"})

    def many(self, fn: Callable[..., Any], n: int, indexed: bool = True) -> list[Any]:
        remote = self._remote(fn).remote
        refs = [remote(i) for i in range(n)] if indexed else [remote() for _ in range(n)]
        return _wait_all([ref.future() for ref in refs])


# -- groups: rows that share a set-up (a cluster, daemons) ------------------------------------


@dataclass
class Group:
    name: str
    rows: list[Row]
    setup: Callable[[], Any] | None = None  # returns a cleanup callable
    notes: list[str] = field(default_factory=list)


def _farpool_executor(address: str, workers: int | None, **options: Any) -> Callable[[], cf.Executor]:
    def make() -> cf.Executor:
        import farpool

        return farpool.Executor(address, max_workers=workers, **options)

    return make


def local_group(cfg: Config) -> Group:
    w = cfg.workers

    def stdlib_processes() -> cf.Executor:
        import multiprocessing

        return cf.ProcessPoolExecutor(w, mp_context=multiprocessing.get_context("fork"))

    def loky_executor() -> cf.Executor:
        import loky

        return loky.ProcessPoolExecutor(w)

    rows: list[Row] = [
        ExecutorRow("stdlib-processes", "concurrent.futures.ProcessPoolExecutor, fork context "
                    "(the baseline)", stdlib_processes),
        ExecutorRow("stdlib-threads", "concurrent.futures.ThreadPoolExecutor",
                    lambda: cf.ThreadPoolExecutor(w)),
        ExecutorRow("loky", "loky.ProcessPoolExecutor", loky_executor),
        ExecutorRow("farpool-processes", "farpool.Executor('processes')",
                    _farpool_executor("processes", w)),
        OptionsRow("farpool-processes-timeout", "farpool.Executor('processes').options("
                   "timeout=60): every task under a time limit",
                   _farpool_executor("processes", w), timeout=60),
        ExecutorRow("farpool-threads", "farpool.Executor('threads')", _farpool_executor("threads", w)),
        ExecutorRow("farpool-inline", "farpool.Executor('inline'): runs in the caller, through "
                    "pickling (latency only)", _farpool_executor("inline", None),
                    metrics=frozenset({"latency"})),
    ]
    return Group("local", rows)


def dask_group(cfg: Config) -> Group:
    # The scheduler's address is known once the cluster runs: the rows read it then.
    state: dict[str, str] = {}

    def setup() -> Callable[[], None]:
        import distributed

        # The echo puts 100 MB in a task, which Dask warns about: the same for both rows.
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        start = time.perf_counter()
        cluster = distributed.LocalCluster(
            n_workers=cfg.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        state["address"] = cluster.scheduler_address
        group.notes.append(f"Dask LocalCluster ({cfg.workers} worker processes, 1 thread each) "
                           f"started in {time.perf_counter() - start:.1f} s (not in the table).")
        return cluster.close

    def farpool_dask() -> cf.Executor:
        import farpool

        host_port = state["address"].split("://", 1)[1]
        # direct_to_workers as in DaskRow (and farpool's own local "dask" backend).
        return farpool.Executor(f"dask://{host_port}", direct_to_workers=True)

    group = Group("dask", [
        DaskRow("dask-native", "Dask Client.submit / Client.map + gather on the cluster",
                lambda: state["address"]),
        ExecutorRow("farpool-dask", "farpool.Executor('dask://...') on the same cluster",
                    farpool_dask, task_scale=ENGINE_TASK_SCALE, sleep_scale=ENGINE_SLEEP_SCALE),
        DaskStreamRow("dask-native-stream", "Dask Client.submit + as_completed(with_results=True): "
                      "each result fetched as its task ends (1 ms tasks only)", lambda: state["address"]),
    ], setup)
    return group


def ray_group(cfg: Config) -> Group:
    def setup() -> Callable[[], None]:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=cfg.workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, object_store_memory=2 * 2**30)
        group.notes.append(f"ray.init(num_cpus={cfg.workers}) took "
                           f"{time.perf_counter() - start:.1f} s (not in the table).")
        return ray.shutdown

    group = Group("ray", [
        RayRow("ray-native", "ray.remote functions + ray.get on the same instance"),
        ExecutorRow("farpool-ray", "farpool.Executor('ray') on the running Ray instance",
                    _farpool_executor("ray", None), task_scale=ENGINE_TASK_SCALE,
                    sleep_scale=ENGINE_SLEEP_SCALE),
        RayFuturesRow("ray-native-futures", "ray.remote functions + ObjectRef.future() per task: each "
                      "result delivered as its task ends (1 ms tasks only)"),
    ], setup)
    return group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the daemon's process group (its own session), then SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    # Workers of a supervisor share its group: make sure none outlives it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def tcp_group(cfg: Config) -> Group:
    """farpool's own daemons on loopback, CURVE on, with a fresh key directory."""
    state: dict[str, Any] = {}

    def setup() -> Callable[[], None]:
        if importlib.util.find_spec("farpool.backends.remote") is None:
            raise RuntimeError("this farpool has no tcp:// backend yet")
        tmp = tempfile.mkdtemp(prefix="farpool-bench-")
        key_dir = os.path.join(tmp, "keys")
        address = f"tcp://127.0.0.1:{_free_port()}"
        module = "farpool" if importlib.util.find_spec("farpool.__main__") else "farpool.cli"
        env = dict(os.environ, FARPOOL_KEY_DIR=key_dir)
        procs: list[subprocess.Popen] = []
        logs: list[str] = []
        saved_env = os.environ.get("FARPOOL_KEY_DIR")

        def cleanup() -> None:
            for proc in reversed(procs):
                _stop_process_group(proc)
            if saved_env is None:
                os.environ.pop("FARPOOL_KEY_DIR", None)
            else:
                os.environ["FARPOOL_KEY_DIR"] = saved_env
            shutil.rmtree(tmp, ignore_errors=True)

        def start(name: str, *args: str) -> subprocess.Popen:
            log = os.path.join(tmp, f"{name}.log")
            logs.append(log)
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            procs.append(proc)
            return proc

        try:
            start_time = time.perf_counter()
            scheduler = start("scheduler", "scheduler", "--bind", address, "--key-dir", key_dir)
            # The scheduler makes the keys; the worker and the client then find them.
            deadline = time.monotonic() + START_TIMEOUT
            while not (os.path.isdir(key_dir) and os.listdir(key_dir)):
                if scheduler.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the scheduler did not start" + _tails(logs))
                time.sleep(0.05)
            start("worker", "worker", address, "--nprocs", str(cfg.workers))
            os.environ["FARPOOL_KEY_DIR"] = key_dir
            state.update(address=address, logs=logs, procs=procs, start=start_time)
        except BaseException:
            cleanup()
            raise
        return cleanup

    def farpool_tcp() -> cf.Executor:
        import farpool

        return farpool.Executor(state["address"])

    class TcpRow(ExecutorRow):
        def open(self) -> None:
            self.ex = self.factory()
            try:
                self.ex.submit(noop).result(START_TIMEOUT)
            except BaseException as exc:
                ex, self.ex = self.ex, None
                _close_bounded(lambda: ex.shutdown(wait=False, cancel_futures=True))
                dead = [p.args[3] for p in state["procs"] if p.poll() is not None]
                raise RuntimeError(f"no first result through the daemons within {START_TIMEOUT:.0f} s "
                                   f"({type(exc).__name__}: {exc}); exited: {dead or 'none'}"
                                   + _tails(state["logs"])) from None
            group.notes.append(
                f"tcp: scheduler and `farpool worker --nprocs {cfg.workers}` started as daemons; "
                f"first result {time.perf_counter() - state['start']:.1f} s after launching them "
                "(not in the table); the start-up column is connecting a client to them.")

    group = Group("tcp", [
        TcpRow("farpool-tcp", "farpool.Executor('tcp://127.0.0.1:PORT'): scheduler and worker "
               "daemons on loopback, CURVE on", farpool_tcp),
    ], setup)
    return group


def _tails(logs: list[str], lines: int = 5) -> str:
    out = []
    for log in logs:
        try:
            with open(log, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            continue
        if tail:
            out.append(f"{os.path.basename(log)}: " + " / ".join(t.strip() for t in tail))
    return "; " + "; ".join(out) if out else ""


def _close_bounded(close: Callable[[], Any]) -> str | None:
    """Run ``close`` in a thread; an error text if it fails or outlasts CLOSE_TIMEOUT."""
    error: list[str] = []

    def run() -> None:
        try:
            close()
        except BaseException as exc:  # noqa: BLE001 - reported as a note
            error.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=run, name="bench-close", daemon=True)
    thread.start()
    thread.join(CLOSE_TIMEOUT)
    if thread.is_alive():
        return f"did not close within {CLOSE_TIMEOUT:.0f} s"
    return error[0] if error else None


# -- measuring ------------------------------------------------------------------------------


def measure(row: Row, metric: str, cfg: Config, echo_array: Any) -> list[float]:
    """One repeat of ``metric`` on ``row``: its samples (seconds, or per second)."""
    n_tasks = max(1, int(cfg.tasks * row.task_scale))
    n_sleep = max(1, int(cfg.sleep_tasks * row.sleep_scale))
    gc.collect()
    if metric == "latency":
        samples = []
        limit = time.perf_counter() + cfg.latency_budget / cfg.latency_repeats
        one = row.one
        for _ in range(cfg.latency_calls):
            t0 = time.perf_counter()
            one(noop)
            t1 = time.perf_counter()
            samples.append(t1 - t0)
            if t1 > limit:
                break
        return samples
    if metric == "submit":
        t0 = time.perf_counter()
        results = row.many(noop, n_tasks, indexed=False)
        elapsed = time.perf_counter() - t0
        if len(results) != n_tasks or any(r is not None for r in results):
            raise AssertionError("wrong results")
        return [n_tasks / elapsed]
    if metric == "map":
        t0 = time.perf_counter()
        results = row.map(square, n_tasks)
        elapsed = time.perf_counter() - t0
        if list(results) != [i * i for i in range(n_tasks)]:
            raise AssertionError("wrong results")
        return [n_tasks / elapsed]
    if metric == "echo":
        t0 = time.perf_counter()
        back = row.one(identity, echo_array)
        elapsed = time.perf_counter() - t0
        if back.nbytes != echo_array.nbytes or back[-1] != echo_array[-1]:
            raise AssertionError("wrong echo")
        del back
        return [elapsed]
    if metric == "startup":
        return [row.first_result()]
    if metric == "sleep":
        t0 = time.perf_counter()
        results = row.many(sleep_1ms, n_sleep)
        elapsed = time.perf_counter() - t0
        if len(results) != n_sleep:
            raise AssertionError("wrong results")
        return [n_sleep / elapsed]
    raise ValueError(metric)


def warm_up(row: Row, metric: str, cfg: Config) -> None:
    """Untimed calls, so a row's first repeat does not pay for caches filling."""
    if metric == "latency":
        for _ in range(20):
            row.one(noop)
    elif metric == "submit":
        row.many(noop, max(1, int(cfg.tasks * row.task_scale) // 10), indexed=False)
    elif metric == "map":
        row.map(square, max(1, int(cfg.tasks * row.task_scale) // 10))
    elif metric == "sleep":
        row.many(sleep_1ms, 2 * cfg.workers)


@dataclass
class Results:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # metric -> repeat -> row -> that repeat's median: the rows of one turn side by side.
    turns: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def median(self, row: str, metric: str) -> float | None:
        values = self.samples.get(row, {}).get(metric)
        return statistics.median(values) if values else None


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def run_group(group: Group, metrics: list[str], cfg: Config, results: Results) -> None:
    for row in group.rows:
        results.descriptions[row.name] = row.description
    cleanup = None
    if group.setup is not None:
        log(f"{group.name}: starting")
        try:
            cleanup = group.setup()
        except Exception as exc:  # noqa: BLE001 - the group's rows are skipped, the run goes on
            for row in group.rows:
                results.skipped[row.name] = f"{group.name} did not start: {type(exc).__name__}: {exc}"
            log(f"{group.name}: skipped ({exc})")
            return
    opened: list[Row] = []
    try:
        for row in group.rows:
            log(f"{row.name}: opening")
            try:
                row.open()
            except Exception as exc:  # noqa: BLE001
                results.skipped[row.name] = f"failed to start: {type(exc).__name__}: {exc}"
                log(f"{row.name}: skipped ({exc})")
                if _close_bounded(row.close) is not None:
                    results.notes.append(f"{row.name}: could not be closed after failing to start")
                continue
            opened.append(row)
        echo_array = None
        if "echo" in metrics and any("echo" in row.metrics for row in opened):
            import numpy as np

            echo_array = np.arange(ECHO_BYTES // 8, dtype=np.float64)
        for metric in metrics:
            rows = [row for row in opened if metric in row.metrics]
            _run_metric(rows, metric, cfg, results, echo_array)
        del echo_array
    finally:
        for row in opened:
            error = _close_bounded(row.close)
            if error is not None:
                results.notes.append(f"{row.name}: closing: {error}")
        if cleanup is not None:
            error = _close_bounded(cleanup)
            if error is not None:
                results.notes.append(f"{group.name}: cleanup: {error}")
        results.notes.extend(group.notes)


def _run_metric(rows: list[Row], metric: str, cfg: Config, results: Results, echo_array: Any) -> None:
    repeats = cfg.latency_repeats if metric == "latency" else cfg.repeats
    budget = cfg.latency_budget if metric == "latency" else cfg.budget
    started = time.perf_counter()
    spent = dict.fromkeys((row.name for row in rows), 0.0)
    live = []
    for row in rows:
        try:
            warm_up(row, metric, cfg)
            live.append(row)
        except Exception as exc:  # noqa: BLE001
            results.errors.setdefault(row.name, {})[metric] = f"{type(exc).__name__}: {exc}"
    for rep in range(repeats):
        # In turns: repeat k of every row before repeat k+1 of any.
        for row in list(live):
            if rep > 0 and spent[row.name] * (rep + 1) / rep > budget:
                continue  # one more repeat would go over the budget
            t0 = time.perf_counter()
            try:
                values = measure(row, metric, cfg, echo_array)
            except Exception as exc:  # noqa: BLE001 - noted; the other rows go on
                results.errors.setdefault(row.name, {})[metric] = f"{type(exc).__name__}: {exc}"
                live.remove(row)
                log(f"{metric}: {row.name} failed: {exc}")
                continue
            spent[row.name] += time.perf_counter() - t0
            results.samples.setdefault(row.name, {}).setdefault(metric, []).extend(values)
            results.turns.setdefault(metric, {}).setdefault(rep, {})[row.name] = statistics.median(values)
    for row in live:
        value = results.median(row.name, metric)
        if value is not None:
            log(f"{metric}: {row.name} {_number(value * METRICS[metric].unit_scale)} "
                f"{METRICS[metric].header.split('(')[-1].rstrip(')')}")
    log(f"{metric}: {time.perf_counter() - started:.1f} s for {len(rows)} rows")


# -- reporting ------------------------------------------------------------------------------

BASELINE = "stdlib-processes"


def _number(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def ratio(results: Results, row: str, metric: str) -> float | None:
    """How many times better than the baseline (its time / this time, or this rate / its rate)."""
    value, base = results.median(row, metric), results.median(BASELINE, metric)
    if value is None or base is None or value <= 0 or base <= 0:
        return None
    return base / value if METRICS[metric].lower_is_better else value / base


def overhead(results: Results, farpool_row: str, native_row: str) -> float | None:
    """Extra time per 1 ms task of farpool's adapter over the engine's own API, in %.

    The median, over the repeats both rows made, of the engine's rate over farpool's:
    each ratio compares two runs made moments apart, so a load swing on a shared
    machine between repeats does not count as overhead.
    """
    ratios = [turn[native_row] / turn[farpool_row] for turn in results.turns.get("sleep", {}).values()
              if turn.get(farpool_row) and turn.get(native_row)]
    if not ratios:
        return None
    return (statistics.median(ratios) - 1) * 100


def _targets(results: Results) -> list[tuple[str, str, bool]]:
    """The figures the issues ask for, where this run measured them."""
    out: list[tuple[str, str, bool]] = []
    med = results.median

    def add(text: str, measured: float | None, shown: str, ok: Callable[[float], bool]) -> None:
        if measured is not None:
            out.append((text, shown.format(measured), ok(measured)))

    r = ratio(results, "farpool-processes", "latency")
    add("processes: round trip below the stdlib's", r, "{:.2f}× the stdlib's speed", lambda v: v > 1)
    add("processes: ≥ 2× the stdlib's no-op submit throughput",
        ratio(results, "farpool-processes", "submit"), "{:.2f}×", lambda v: v >= 2)
    add("processes: 100 MB echo ≥ 3× faster than the stdlib",
        ratio(results, "farpool-processes", "echo"), "{:.2f}×", lambda v: v >= 3)
    startup = med("farpool-processes", "startup")
    add("processes: start-up to first result < 150 ms", startup and startup * 1e3, "{:.0f} ms",
        lambda v: v < 150)
    ours, theirs = med("farpool-threads", "latency"), med("stdlib-threads", "latency")
    add("threads: round trip within 2× of the stdlib ThreadPoolExecutor's",
        ours / theirs if ours and theirs else None, "{:.2f}× its time", lambda v: v <= 2)
    lat = med("farpool-tcp", "latency")
    add("tcp (CURVE, loopback): round trip < 150 µs", lat and lat * 1e6, "{:.0f} µs", lambda v: v < 150)
    add("tcp: no-op throughput > 20,000 tasks/s", med("farpool-tcp", "submit"), "{:,.0f}/s",
        lambda v: v > 20_000)
    add("tcp: 100 MB echo < 1 s", med("farpool-tcp", "echo"), "{:.2f} s", lambda v: v < 1)
    for engine in ("dask", "ray"):
        add(f"{engine}: farpool's overhead on 1 ms tasks < 10%",
            overhead(results, f"farpool-{engine}", f"{engine}-native"), "{:+.1f}%", lambda v: v < 10)
    return out


def report(results: Results, order: list[str], metrics: list[str], cfg: Config, argv: list[str]) -> str:
    lines: list[str] = []
    add = lines.append
    cpus = os.cpu_count()
    add("`" + " ".join(["python scripts/bench.py", *argv]) + "`")
    add("")
    add(f"{datetime.date.today().isoformat()} · {cpus} CPUs · {platform.system()} · "
        f"Python {platform.python_version()} · {cfg.workers} workers everywhere · "
        f"medians; in brackets: × the stdlib ProcessPoolExecutor (fork), higher is better")
    add("")
    shown = [name for name in order if name in results.samples or name in results.errors]
    add("| executor | " + " | ".join(METRICS[m].header for m in metrics) + " |")
    add("|---|" + "---:|" * len(metrics))
    for name in shown:
        cells = []
        for m in metrics:
            value = results.median(name, m)
            if value is None:
                cells.append("failed" if m in results.errors.get(name, {}) else "–")
                continue
            cell = _number(value * METRICS[m].unit_scale)
            r = ratio(results, name, m)
            if r is not None and name != BASELINE:
                cell += f" ({_number(r)}×)"
            cells.append(cell)
        add(f"| {name} | " + " | ".join(cells) + " |")
    add("")

    # The engine's own API both ways: all results at the end, and each as its task ends
    # (what a future per task costs the engine, farpool or not).
    triples = [("farpool-dask", "dask-native", "dask-native-stream"),
               ("farpool-ray", "ray-native", "ray-native-futures")]
    rows = [(ours, native, stream, overhead(results, ours, native)) for ours, native, stream in triples]
    rows = [r for r in rows if r[3] is not None]
    if rows:
        add("| adapter (1 ms tasks) | engine's own API (tasks/s) | through farpool (tasks/s) "
            "| overhead (target < 10%) | engine's own, each result as its task ends (tasks/s) "
            "| its overhead |")
        add("|---|---:|---:|---:|---:|---:|")
        for ours, native, stream, pct in rows:
            streamed, stream_pct = results.median(stream, "sleep"), overhead(results, stream, native)
            own = "– | –"
            if streamed and stream_pct is not None:
                own = f"{_number(streamed)} | {stream_pct:+.1f}%"
            add(f"| {ours} | {_number(results.median(native, 'sleep'))} | "
                f"{_number(results.median(ours, 'sleep'))} | {pct:+.1f}% | {own} |")
        add("")

    targets = _targets(results)
    if targets:
        add("| target | measured | met |")
        add("|---|---:|:---:|")
        for text, measured, ok in targets:
            add(f"| {text} | {measured} | {'yes' if ok else '**no**'} |")
        add("")

    add("Notes:")
    for name in shown:
        add(f"- `{name}`: {results.descriptions.get(name, '')}")
    add(f"- no-op submit: {cfg.tasks:,} `submit(noop)` then wait for all; map: "
        f"`list(map(square, range({cfg.tasks:,})))` with the default chunksize (1). 1 ms tasks: "
        f"{cfg.sleep_tasks:,} × `time.sleep(0.001)` submitted then waited for "
        f"(ideal: {cfg.workers / SLEEP_SECONDS:,.0f}/s). Dask and Ray rows, native and through "
        f"farpool alike, use smaller bursts: {int(cfg.tasks * ENGINE_TASK_SCALE):,} and "
        f"{int(cfg.sleep_tasks * ENGINE_SLEEP_SCALE):,} tasks. Adapter overhead: the median over "
        f"repeats of the engine's rate / farpool's, each pair measured in the same turn.")
    add("- start-up: from creating the executor to its first result, a fresh executor each "
        "time (closing not counted); for Dask and Ray rows, attaching to the running cluster.")
    for name, why in results.skipped.items():
        add(f"- `{name}` skipped: {why}")
    for name, errs in results.errors.items():
        for m, why in errs.items():
            add(f"- `{name}` {m} failed: {why}")
    for note in results.notes:
        add(f"- {note}")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_groups(cfg: Config) -> tuple[list[Group], dict[str, str]]:
    """Every group, and the reason a row cannot run here (a missing package)."""
    # farpool's own daemons before the engines: ray.shutdown() leaves about ten of
    # Ray's native threads in this process, and measured after it the daemons' client
    # lost a third of its throughput (16,000 tasks/s there, 23,000-26,000/s before).
    groups = [local_group(cfg), tcp_group(cfg), dask_group(cfg), ray_group(cfg)]
    missing: dict[str, str] = {}
    for name, module in (("loky", "loky"), ("dask-native", "distributed"), ("farpool-dask", "distributed"),
                         ("dask-native-stream", "distributed"), ("ray-native", "ray"),
                         ("farpool-ray", "ray"), ("ray-native-futures", "ray")):
        if not _installed(module):
            missing[name] = f"{module} is not installed"
    return groups, missing


class BackgroundLoad:
    """Busy processes at the lowest priority (nice 19), one per core: the machine state
    of a box where other jobs run. The rows measured meanwhile get the cores first,
    but share caches, memory bandwidth and the scheduler's attention."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._running: list[subprocess.Popen] = []

    def __enter__(self) -> BackgroundLoad:
        spin = "import os\nos.nice(19)\nwhile True:\n    pass\n"
        for _ in range(self.procs):
            self._running.append(subprocess.Popen([sys.executable, "-c", spin],
                                                  stdin=subprocess.DEVNULL))
        time.sleep(0.5)  # let them reach their loop
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._running:
            proc.kill()
        for proc in self._running:
            proc.wait(10)
        self._running.clear()


def measure_all(cfg: Config, only: set[str], metrics: list[str]) -> tuple[Results, list[str], bool]:
    """One pass over the chosen rows: the results, the rows' order, and whether it
    was interrupted."""
    groups, missing = build_groups(cfg)
    order = [row.name for g in groups for row in g.rows if row.name in only]
    results = Results()
    started = time.perf_counter()
    interrupted = False
    try:
        for group in groups:
            rows = [row for row in group.rows if row.name in only]
            for row in rows:
                if row.name in missing:
                    results.skipped[row.name] = missing[row.name]
                    results.descriptions[row.name] = row.description
            group.rows = [row for row in rows if row.name not in missing]
            if group.rows:
                run_group(group, metrics, cfg, results)
    except KeyboardInterrupt:
        log("interrupted: cleaned up; partial results follow")
        results.notes.append("the run was interrupted: partial results")
        interrupted = True
    results.notes.append(f"whole run: {time.perf_counter() - started:.0f} s.")
    return results, order, interrupted


def states_table(states: list[tuple[str, Results]], order: list[str], metrics: list[str]) -> str:
    """Each row's median, and its ratio to the stdlib's process pool measured in the
    same state, one column per machine state."""
    lines = ["| executor | " + " | ".join(f"{METRICS[m].header}: {state}" for m in metrics
                                           for state, _ in states) + " |",
             "|---|" + "---:|" * (len(metrics) * len(states))]
    for name in order:
        cells = []
        for m in metrics:
            for _, results in states:
                value = results.median(name, m)
                r = ratio(results, name, m)
                cell = "–" if value is None else _number(value * METRICS[m].unit_scale)
                if value is not None and r is not None:
                    cell += f" ({_number(r)}×)"
                cells.append(cell)
        if any(c != "–" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_numbers(results: Results, order: list[str], metrics: list[str]) -> dict[str, Any]:
    return {"medians": {row: {m: results.median(row, m) for m in metrics} for row in order},
            "samples": results.samples, "turns": results.turns, "errors": results.errors,
            "skipped": results.skipped, "notes": results.notes}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tasks (smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated rows to run (default: all)")
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated metrics (default: all of {','.join(METRICS)})")
    parser.add_argument("--workers", type=int, default=2, help="workers for every executor (default 2)")
    parser.add_argument("--load", action="store_true",
                        help="run everything twice: idle, then beside background CPU load at "
                             "the lowest priority (one busy process per core), and compare")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    cfg = Config.make(args.quick, args.workers)
    groups, _ = build_groups(cfg)
    all_rows = [row.name for g in groups for row in g.rows]
    del groups
    only = set(all_rows) if args.only is None else {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := only - set(all_rows):
        parser.error(f"unknown rows {sorted(unknown)}; the rows are {', '.join(all_rows)}")
    metrics = list(METRICS) if args.metrics is None else [s.strip() for s in args.metrics.split(",")]
    if unknown := set(metrics) - set(METRICS):
        parser.error(f"unknown metrics {sorted(unknown)}; the metrics are {', '.join(METRICS)}")

    # SIGTERM ends the run like Ctrl-C does: every daemon and cluster is cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    states: list[tuple[str, Results]] = []
    results, order, interrupted = measure_all(cfg, only, metrics)
    states.append(("idle", results))
    if args.load and not interrupted:
        procs = os.cpu_count() or 1
        log(f"again, beside {procs} busy processes at nice 19")
        with BackgroundLoad(procs):
            loaded, _, interrupted = measure_all(cfg, only, metrics)
        loaded.notes.append(f"measured beside {procs} busy processes at nice 19 (--load)")
        states.append(("loaded", loaded))
    for state, res in states:
        if len(states) > 1:
            print(f"\n### {state}\n")
        print(report(res, order, metrics, cfg, argv))
    if len(states) > 1:
        print("\n### both states (in brackets: × the stdlib ProcessPoolExecutor in the same state)\n")
        print(states_table(states, order, metrics))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "argv": argv, "cpus": os.cpu_count(), "python": platform.python_version(),
                "config": cfg.__dict__, "baseline": BASELINE,
                # The idle run at the top level; with --load, the loaded one under "loaded".
                **raw_numbers(states[0][1], order, metrics),
                **({"loaded": raw_numbers(states[1][1], order, metrics)} if len(states) > 1 else {}),
            }, f, indent=1)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
