"""The client's main script as a module on its workers, as the stdlib's spawn does.

cloudpickle pickles what ``__main__`` defines by value: each function with a copy of
the globals it names. A global the initializer sets is then not the one a task reads,
and an object of a script class cannot be unpickled inside a task. The stdlib's spawn
workers instead import the main script as the module ``__mp_main__`` (its ``if
__name__ == "__main__":`` block not run), so script functions pickle as names.
farpool does the same: what the script defines pickles as ``__main__.NAME``
(``main_reference``), and on the worker ``__main__`` is the script:

- a local worker process gets the script's source at start and installs it as a lazy
  ``__main__``/``__mp_main__`` (``install_local``): the script runs on the first
  reference to it, so a pool that never uses a script function never runs it;
- a daemon's worker processes serve many clients: each client's script (and its local
  modules) is a namespace of its own there, swapped in around each of its tasks
  (``code_bundle``);
- the client aliases ``__mp_main__`` to its own ``__main__``, so a worker's result of a
  script class unpickles as the client's class.

Where there is no script file (``python -c``, the REPL, a notebook, a package's
``__main__``), or the script has no ``if __name__ == "__main__":`` (its top level is
the program, which a worker must not run), ``client_script`` returns None and by-value
pickling stays.

This module runs inside workers: it imports nothing heavy.
"""

from __future__ import annotations

import ast
import sys
import threading
import types
from typing import Any, NamedTuple

__all__ = ["MainScript", "client_script", "install_local", "lazy_module", "main_reference"]

LOCAL_NAME = "__mp_main__"


class MainScript(NamedTuple):
    """The client's main script, as it travels to workers."""

    path: str  # where the client read it (tracebacks name it)
    source: str
    package: str | None  # the package it belongs to when run as ``python -m pkg.mod``
    argv: tuple[str, ...]  # sys.argv while it runs on a worker, as spawn gives
    token: str  # digest of path and source: one module per distinct script


_cache_lock = threading.Lock()
_client_script: list[MainScript | None] = []


def client_script() -> MainScript | None:
    """This interpreter's main script, read once; None where there is no file to
    import on a worker (see the module docstring)."""
    with _cache_lock:
        if not _client_script:
            _client_script.append(_read_main())
        script = _client_script[0]
    if script is not None and "__main__" in sys.modules:
        # What workers send back names the script __mp_main__ (see the module docstring).
        sys.modules.setdefault(LOCAL_NAME, sys.modules["__main__"])
    return script


def _read_main() -> MainScript | None:
    main = sys.modules.get("__main__")
    if main is None or getattr(sys, "frozen", False):
        return None
    spec = getattr(main, "__spec__", None)
    package: str | None = None
    if spec is not None and spec.name:
        # A package's __main__ (python -m pkg, pytest) is skipped, as by the stdlib.
        if spec.name == "__main__" or spec.name.endswith(".__main__"):
            return None
        path = spec.origin
        package = spec.parent or None
    else:
        path = getattr(main, "__file__", None)
    if not path or not isinstance(path, str) or path.startswith("<"):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        source = data.decode("utf-8")
        tree = ast.parse(source, path)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None  # not a Python source file we can run elsewhere
    if not _guards_its_entry_point(tree):
        # Its top level is the program: run on a worker it would start executors of its
        # own. Where the stdlib forks (Linux before 3.14) such scripts work: by value.
        return None
    import hashlib

    token = hashlib.blake2b(path.encode() + b"\0" + data, digest_size=8).hexdigest()
    return MainScript(path, source, package, tuple(sys.argv), token)


def _guards_its_entry_point(tree: ast.Module) -> bool:
    """Whether the script has a top-level ``if __name__ == "__main__":``."""
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            test = node.test
            sides = [test.left, *test.comparators]
            if (len(sides) == 2 and isinstance(test.ops[0], ast.Eq)
                    and any(isinstance(n, ast.Name) and n.id == "__name__" for n in sides)
                    and any(isinstance(n, ast.Constant) and n.value == "__main__" for n in sides)):
                return True
    return False


def main_reference(obj: Any) -> bool:
    """True if ``obj`` is a function or class the main script defines at a name (so a
    pickler can write it as the global ``__main__.NAME``)."""
    if getattr(obj, "__module__", None) != "__main__":
        return False
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<" in qualname:
        return False  # a lambda or a nested function: by value
    found: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


_run_lock = threading.RLock()


def install_local(script: MainScript) -> None:
    """In a local worker process: the script becomes ``__main__`` and ``__mp_main__``,
    run on first use, with the client's ``sys.argv`` as spawn gives."""
    sys.argv[:] = script.argv
    module = lazy_module(script)
    sys.modules["__main__"] = sys.modules[LOCAL_NAME] = module


def lazy_module(script: MainScript) -> types.ModuleType:
    """A module ``__mp_main__`` whose code is the script's, run on first use."""
    name = LOCAL_NAME
    module = types.ModuleType(name)
    module.__file__ = script.path
    module.__package__ = script.package
    failure: list[BaseException] = []

    def run_script(attr: str) -> Any:
        # PEP 562: called only for a name the module lacks; the first one runs the script.
        # Not for a dunder: tools probe modules for those (__path__, __wrapped__...).
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        with _run_lock:
            if vars(module).get("__getattr__") is run_script:
                del module.__getattr__
                _run(script, module, failure)
        if failure:
            raise ImportError(f"the main script {script.path} failed when run on the worker as "
                              f"module {name} ({type(failure[0]).__name__}: {failure[0]})"
                              ) from failure[0]
        return vars(module)[attr] if attr in vars(module) else _missing(module, attr)

    module.__getattr__ = run_script  # type: ignore[method-assign]
    return module


def _missing(module: types.ModuleType, attr: str) -> Any:
    hook = vars(module).get("__getattr__")  # the script's own, if it has one
    if hook is not None:
        return hook(attr)
    raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")


_running = threading.local()


def check_not_bootstrapping() -> None:
    """Raise if the main script is being run on a worker (see ``lazy_module``) and its
    top level starts an executor: a script without ``if __name__ == "__main__":``. Each
    worker would start workers of its own, without end; spawn's stdlib pools raise the
    same way."""
    if getattr(_running, "script", None) is not None:
        raise RuntimeError(
            f"the main script {_running.script} started an executor while a farpool worker "
            "ran it to load a function or class it defines. Put the code that starts "
            "executors under `if __name__ == \"__main__\":` (the stdlib's spawn pools need "
            "the same)")


def _run(script: MainScript, module: types.ModuleType, failure: list[BaseException]) -> None:
    argv = sys.argv[:]
    sys.argv[:] = script.argv
    _running.script = script.path
    try:
        exec(compile(script.source, script.path, "exec"), vars(module))
    except BaseException as exc:  # noqa: BLE001 - kept: every use reports it
        failure.append(exc)
    finally:
        _running.script = None
        sys.argv[:] = argv
