"""What a script's own functions and classes see on the workers, against the stdlib.

The stdlib's process pool imports the main script on its workers (as ``__mp_main__``),
so the script's functions share one set of globals there. farpool does the same on
local processes and on the daemons (see farpool.main_script); before, each function was
pickled with its own copy of the globals it names, and the initializer example below
printed {'before'}: a wrong answer with no error.

Each case runs a real script in a fresh interpreter, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent('''
    import concurrent.futures as cf
    import os
    import pickle
    import sys
    import time
    from dataclasses import dataclass

    import farpool

    STATE = "before"

    def init(value):
        global STATE
        STATE = value

    def read_state(_):
        return STATE

    def set_owner(_):
        global OWNER
        OWNER = os.getpid()
        time.sleep(0.3)  # both workers get one

    def owner_is_me(_):
        return globals().get("OWNER") == os.getpid()

    @dataclass
    class Point:
        x: int
        y: int

    class ScriptError(Exception):
        pass

    def unpickle(data):
        return pickle.loads(data)

    def make_point(x):
        return Point(x, -x)

    def fail(_):
        raise ScriptError("from the script")

    def executor(address, **kwargs):
        if address == "stdlib":
            return cf.ProcessPoolExecutor(2, **kwargs)
        return farpool.Executor(address, max_workers=2, **kwargs)

    if __name__ == "__main__":
        address = sys.argv[1]
        with executor(address, initializer=init, initargs=("initialized",)) as ex:
            print("initializer:", sorted(set(ex.map(read_state, range(8)))))
        with executor(address) as ex:
            list(ex.map(set_owner, range(2)))
            print("globals:", set(ex.map(owner_is_me, range(10))))
            print("pickle.loads in a task:", ex.submit(unpickle, pickle.dumps(Point(1, 2))).result())
            point = ex.submit(make_point, 3).result()
            print("result class:", type(point) is Point, point)
            error = ex.submit(fail, 0).exception()
            print("exception class:", type(error) is ScriptError, error)
''')

EXPECTED = """\
initializer: ['initialized']
globals: {True}
pickle.loads in a task: Point(x=1, y=2)
result class: True Point(x=3, y=-3)
exception class: True from the script
"""


def run_script(tmp_path, source: str, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "user_script.py"
    path.write_text(source)
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=90, cwd=cwd or tmp_path, env={**os.environ, **(env or {})})


def engine_address(request, engine: str) -> tuple[str, dict[str, str]]:
    """The session's Dask or Ray cluster, as a script in another process reaches it."""
    if engine == "dask":
        return request.getfixturevalue("dask_cluster"), {}
    gcs, _, env = request.getfixturevalue("ray_head")
    return "ray", {"RAY_ADDRESS": gcs, "RAY_AUTH_MODE": env["RAY_AUTH_MODE"],
                   "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"]}


def test_the_stdlib_answers_as_expected(tmp_path):
    # The reference the other cases must match.
    done = run_script(tmp_path, SCRIPT, "stdlib")
    assert done.stdout == EXPECTED, done.stderr


@pytest.mark.parametrize("address", ["processes", "inline"])
def test_script_globals_and_classes_locally(tmp_path, address):
    done = run_script(tmp_path, SCRIPT, address)
    assert done.stdout == EXPECTED, done.stderr


def test_script_globals_and_classes_on_daemons(tmp_path, tcp_cluster):
    # The daemon's workers run in another directory, where the script does not exist:
    # its source travels with the client's functions.
    done = run_script(tmp_path, SCRIPT, tcp_cluster)
    assert done.stdout == EXPECTED, done.stderr


@pytest.mark.parametrize("engine", ["dask", "ray"])
def test_script_globals_and_classes_on_engines(tmp_path, engine, request):
    # Before, Dask and Ray pickled script functions by value: the initializer case
    # printed ['before'] (a wrong answer, no error).
    address, env = engine_address(request, engine)
    done = run_script(tmp_path, SCRIPT, address, env=env)
    assert done.stdout == EXPECTED, done.stderr[-3000:]


FAILS_ON_WORKERS = textwrap.dedent('''
    import sys
    import farpool

    if __name__ != "__main__":
        raise RuntimeError("this script refuses to be imported")

    def square(x):
        return x * x

    if __name__ == "__main__":
        with farpool.Executor(sys.argv[1], max_workers=1) as ex:
            error = ex.submit(square, 3).exception(timeout=60)
            print(type(error).__name__)
            print(error)
            print(ex.submit(pow, 2, 5).result(timeout=60))
''')


@pytest.mark.parametrize("where", ["processes", "daemons"])
def test_a_script_that_fails_on_the_workers_fails_its_tasks_clearly(tmp_path, where, request):
    # The user sees each task of a script function fail with an error that names the
    # script and its exception; other functions still run.
    address = request.getfixturevalue("tcp_cluster") if where == "daemons" else "processes"
    done = run_script(tmp_path, FAILS_ON_WORKERS, address)
    lines = done.stdout.splitlines()
    assert len(lines) >= 3, done.stderr
    assert lines[0] == "UnpicklingFailed", done.stdout
    assert "user_script.py failed when run on the worker" in done.stdout
    assert "this script refuses to be imported" in done.stdout
    assert lines[-1] == "32"


NEVER_USED = textwrap.dedent('''
    import sys
    import farpool

    print("top level ran", flush=True)

    if __name__ == "__main__":
        with farpool.Executor(sys.argv[1], max_workers=1) as ex:
            print(ex.submit(pow, 2, 5).result(timeout=60))
''')


def test_a_script_never_used_by_a_task_is_not_run_on_the_workers(tmp_path):
    # Lazy, unlike the stdlib's spawn: a pool that runs only library functions pays
    # nothing for a script with heavy imports.
    done = run_script(tmp_path, NEVER_USED, "processes")
    assert done.stdout == "top level ran\n32\n", done.stderr


def test_python_c_keeps_by_value_pickling():
    # No file to import on a worker: functions travel by value, as before.
    code = textwrap.dedent('''
        import farpool
        def square(x):
            return x * x
        with farpool.Executor("processes", max_workers=1) as ex:
            print(ex.submit(square, 7).result(timeout=60))
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert done.stdout == "49\n", done.stderr


def test_a_script_without_a_main_guard_runs_as_under_fork(tmp_path):
    # Its top level is the program (it works with the stdlib where it forks): running it
    # on a worker would start executors there. Its functions travel by value instead.
    unguarded = textwrap.dedent('''
        import farpool
        def square(x):
            return x * x
        with farpool.ProcessPoolExecutor(2) as ex:
            print(sorted(ex.map(square, range(4))))
    ''')
    done = run_script(tmp_path, unguarded)
    assert done.stdout == "[0, 1, 4, 9]\n", done.stderr


def test_a_guarded_script_that_starts_an_executor_at_its_top_level_fails_clearly(tmp_path):
    # An executor outside the guard: each worker running the script would start one of
    # its own, without end. The task fails with an error that says what to change.
    script = textwrap.dedent('''
        import farpool
        def square(x):
            return x * x
        ex = farpool.ProcessPoolExecutor(1)
        if __name__ == "__main__":
            try:
                print(ex.submit(square, 3).result(timeout=60))
            except Exception as exc:
                print(type(exc).__name__, exc)
            ex.shutdown()
    ''')
    done = run_script(tmp_path, script)
    assert done.stdout.startswith("UnpicklingFailed"), done.stdout + done.stderr
    assert 'under `if __name__ == "__main__":`' in done.stdout
