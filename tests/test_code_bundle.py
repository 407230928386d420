"""A script's own code on the daemons' workers (farpool.code_bundle) and `farpool run`.

The example (examples/wordstats) is an unmodified stdlib script with a sibling helper
module and an initializer that sets a global. Before, against tcp:// daemons it failed
on the workers with ModuleNotFoundError: textstats; and the initializer's global was
silently not the one the tasks read.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farpool import code_bundle
from farpool.code_bundle import BundleMaker, CodeBundle, ShippedModule
from farpool.main_script import MainScript

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "wordstats"


@pytest.fixture
def example(tmp_path):
    """A copy of the example in a directory of its own; returns the script's path."""
    where = tmp_path / "project"
    shutil.copytree(EXAMPLE, where)
    return where / "wordstats.py"


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=cwd,
                          env={**os.environ, **env})


def farpool_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "farpool", "run", *args], cwd)


def test_the_example_runs_unchanged_under_farpool_run(example, tmp_path, tcp_cluster):
    # From another directory, as a user might: the daemons' workers never had the
    # project (their working directory is not it, and it is not on their path).
    plain = run([sys.executable, str(example), "12"], example.parent)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("12 documents,")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    local = farpool_run(str(example), "12", cwd=elsewhere)
    assert (local.returncode, local.stdout) == (0, plain.stdout), local.stderr
    from remote_cluster import status

    done_before = status(tcp_cluster)["done"]
    remote = farpool_run("--address", tcp_cluster, str(example), "12", cwd=elsewhere)
    assert (remote.returncode, remote.stdout) == (0, plain.stdout), remote.stderr
    assert status(tcp_cluster)["done"] >= done_before + 12  # they ran on the daemons


def test_farpool_run_reports_bad_input(tmp_path):
    missing = farpool_run(str(tmp_path / "nope.py"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such script" in missing.stderr
    script = tmp_path / "ok.py"
    script.write_text("import sys; sys.exit(3)\n")
    bad = farpool_run("--address", "carrier-pigeon://x", str(script), cwd=tmp_path)
    assert bad.returncode == 2 and "unknown address" in bad.stderr
    assert farpool_run(str(script), cwd=tmp_path).returncode == 3  # the script's own status


def test_without_shipping_the_workers_say_what_is_missing(example, tmp_path, tcp_cluster):
    code = (
        "import sys, farpool\n"
        f"sys.path.insert(0, {str(example.parent)!r})\n"
        "import textstats\n"
        f"with farpool.Executor({tcp_cluster!r}, ship_modules=False) as ex:\n"
        "    print(repr(ex.submit(textstats.analyse, 'a b').exception(timeout=60)))\n"
    )
    script = tmp_path / "noship.py"
    script.write_text(code)
    done = run([sys.executable, str(script)], tmp_path)
    assert "No module named 'textstats'" in done.stdout, done.stdout + done.stderr


# -- the worker's side, in this process ----------------------------------------------------


@pytest.fixture
def clean_namespaces():
    yield
    code_bundle._namespaces.clear()
    if code_bundle._FINDER in sys.meta_path:
        sys.meta_path.remove(code_bundle._FINDER)
    sys.modules.pop("fp_shipped_demo", None)


def bundle(token: str, value: int, main_value: int | None = None, *more: ShippedModule) -> CodeBundle:
    module = ShippedModule("fp_shipped_demo", f"/{token}/fp_shipped_demo.py", f"VALUE = {value}\n", False)
    main = None
    if main_value is not None:
        main = MainScript(f"/{token}/script.py", f"X = {main_value}\n", None, ("script.py",), token)
    return CodeBundle(token, main, (module, *more), f"{token}-{len(more)}")


def test_two_clients_code_of_the_same_name_never_meet(clean_namespaces):
    # One worker process, two clients whose helper modules share a name: each task
    # sees its own client's module and script, and neither stays behind after.
    main_before = sys.modules["__main__"]
    first = code_bundle._bind(bundle("one", 1, main_value=10), pickle.dumps(importlib.import_module))
    second = code_bundle._bind(bundle("two", 2, main_value=20), pickle.dumps(importlib.import_module))
    for fn, value, x in ((first, 1, 10), (second, 2, 20), (first, 1, 10)):
        with fn.namespace:
            assert fn("fp_shipped_demo").VALUE == value
            assert sys.modules["__main__"].X == x
        assert "fp_shipped_demo" not in sys.modules
        assert sys.modules["__main__"] is main_before
    with first.namespace:
        first("fp_shipped_demo").VALUE = 99  # a module global a task set...
    with first.namespace:
        assert first("fp_shipped_demo").VALUE == 99  # ...is there for the next task


def test_modules_imported_later_join_the_same_namespace(clean_namespaces):
    # A script that imports another local module after its first tasks: its later
    # functions come with a bigger bundle. The globals set so far (by a task, by the
    # initializer) must still be there: a fresh namespace would silently lose them.
    first = code_bundle._bind(bundle("one", 1, 10), pickle.dumps(importlib.import_module))
    with first.namespace:
        first("fp_shipped_demo").VALUE = 41
    later = ShippedModule("fp_shipped_later", "/one/fp_shipped_later.py", "LATE = True\n", False)
    second = code_bundle._bind(bundle("one", 1, 10, later), pickle.dumps(importlib.import_module))
    assert second.namespace is first.namespace
    with second.namespace:
        assert second("fp_shipped_demo").VALUE == 41
        assert second("fp_shipped_later").LATE is True
    assert "fp_shipped_later" not in sys.modules


def test_a_compiled_module_that_cannot_travel_is_named(clean_namespaces):
    compiled = ShippedModule("fp_compiled_demo", "/proj/fp_compiled_demo.so", None, False)
    fn = code_bundle._bind(CodeBundle("c", None, (compiled,), "c"), pickle.dumps(importlib.import_module))
    with fn.namespace, pytest.raises(ImportError, match="fp_compiled_demo is a compiled module .* "
                                     "install it on the workers"):
        fn("fp_compiled_demo")


def test_ship_modules_is_checked_and_bounded(monkeypatch):
    with pytest.raises(TypeError, match="ship_modules"):
        BundleMaker("json")
    with pytest.raises(ValueError, match="not imported here"):
        BundleMaker(["fp_never_imported"])
    import json

    made = BundleMaker([json]).current()
    assert made is not None and "json" in [m.name for m in made.modules]
    assert all(not m.name.startswith("farpool") for m in made.modules)
    monkeypatch.setattr(code_bundle, "MAX_BUNDLE_BYTES", 1000)
    with pytest.raises(ValueError, match="install it on the workers and pass ship_modules=False"):
        BundleMaker(["json"]).current()


@pytest.mark.parametrize("engine", ["dask", "ray"])
def test_the_example_runs_unchanged_on_the_engines(example, tmp_path, engine, request):
    # Before, the initializer's global was not the one the tasks read there, and the
    # example's own check failed.
    from test_main_script import engine_address

    address, env = engine_address(request, engine)
    plain = run([sys.executable, str(example), "6"], example.parent)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run([sys.executable, "-m", "farpool", "run", "--address", address, str(example), "6"],
               elsewhere, **env)
    assert (done.returncode, done.stdout) == (0, plain.stdout), done.stderr[-3000:]
