"""Executor options are checked in one place, before anything starts: an unknown
option names the ones the backend takes; a bad value fails as the stdlib's would."""

from __future__ import annotations

import threading
import time

import pytest

import farpool

# No daemon listens here: every case must fail before any connection is tried.
UNUSED_TCP = "tcp://127.0.0.1:9"


@pytest.mark.parametrize("address", ["processes", "threads", "inline", UNUSED_TCP])
def test_an_unknown_option_is_a_type_error_naming_the_backends_options(address):
    threads_before = threading.active_count()
    with pytest.raises(TypeError, match=r"takes no option 'bogus'; its options are: .*max_workers"):
        farpool.Executor(address, bogus=1)
    assert threading.active_count() == threads_before  # nothing was started


@pytest.mark.parametrize("address", ["processes", "threads", "inline", UNUSED_TCP])
@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                        (True, TypeError), ("2", TypeError)])
def test_a_bad_max_workers_fails_as_the_stdlib_does(address, bad, error):
    with pytest.raises(error, match="max_workers"):
        farpool.Executor(address, max_workers=bad)


@pytest.mark.parametrize("address", ["processes", UNUSED_TCP])
@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_retries_are_refused(address, bad):
    with pytest.raises(ValueError, match="retries must be an int from 0 to 100"):
        farpool.Executor(address, retries=bad)


@pytest.mark.parametrize("address", ["processes", "threads", "inline", UNUSED_TCP])
def test_an_initializer_that_is_not_callable_is_refused(address):
    with pytest.raises(TypeError, match="initializer must be a callable"):
        farpool.Executor(address, initializer=42)


def test_the_drop_ins_keep_the_stdlib_errors():
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        farpool.ProcessPoolExecutor(0)
    with pytest.raises(TypeError):
        farpool.ThreadPoolExecutor(max_workers=2, bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        farpool.ProcessPoolExecutor(1, max_tasks_per_child=0)


@pytest.mark.parametrize("scheme", ["dask", "ray"])
def test_a_mistyped_engine_option_is_a_type_error_before_the_engine_starts(scheme):
    # What the user sees: the option named, at once, instead of the engine's own error
    # from deep in its start-up ("Nanny failed to start", "Unknown keyword argument").
    pytest.importorskip("distributed" if scheme == "dask" else "ray")
    started = time.monotonic()
    with pytest.raises(TypeError, match="takes no option 'max_worker'.*max_workers"):
        farpool.Executor(scheme, max_worker=2)
    assert time.monotonic() - started < 5


def test_options_the_engines_take_pass_the_check():
    distributed = pytest.importorskip("distributed")
    from distributed.core import Server

    from farpool.backends.options import check_passed_on

    chain = [distributed.LocalCluster.__init__, distributed.Nanny.__init__,
             distributed.Worker.__init__, Server.__init__]
    # One option of each step of the chain: the cluster's, the nanny's, the worker's.
    check_passed_on("dask", {"silence_logs": 40, "memory_limit": "1GiB", "nthreads": 1,
                             "local_directory": "/tmp"}, (), chain, "LocalCluster")
    ray = pytest.importorskip("ray")
    check_passed_on("ray", {"num_cpus": 1, "_temp_dir": "/tmp/x"}, (), [ray.init], "ray.init",
                    private_ok=True)
    with pytest.raises(TypeError, match="'num_cpu'"):
        check_passed_on("ray", {"num_cpu": 1}, (), [ray.init], "ray.init", private_ok=True)
