"""The client's main script as a module on its workers, as the stdlib's spawn does.

cloudpickle pickles what ``__main__`` defines by value: each function with a copy of
the globals it names. A global the initializer sets is then not the one a task reads,
and an object of a script class cannot be unpickled inside a task. The stdlib's spawn
workers instead import the main script as the module ``__mp_main__`` (its ``if
__name__ == "__main__":`` block not run), so script functions pickle as names.
farpool does the same:

- local worker processes get the script's source at start and install it as a lazy
  ``__main__``/``__mp_main__`` (``install_local``): the script runs on the first
  reference to it, so a pool that never uses a script function never runs the
  script; references are plain ``__main__.NAME`` globals (``LOCAL``);
- a daemon's worker processes serve many clients, so each script is its own module,
  ``__farpool_main_<digest>__``, and references name the digest (``_main_attr``).
  Every function blob carries the script (``with_main``), once per function and
  worker, and runs its task with ``sys.modules["__main__"]`` set to that module;
- the client aliases those module names to its own ``__main__``, so a worker's
  result of a script class unpickles as the client's class.

Where there is no script file (``python -c``, the REPL, a notebook, a package's
``__main__``), ``client_script`` returns None and by-value pickling stays.

This module runs inside workers: it imports nothing heavy.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["LOCAL", "MainRef", "MainScript", "client_script", "install_local", "main_reference",
           "with_main"]

LOCAL_NAME = "__mp_main__"


class MainScript(NamedTuple):
    """The client's main script, as it travels to workers."""

    path: str  # where the client read it (tracebacks name it)
    source: str
    package: str | None  # the package it belongs to when run as ``python -m pkg.mod``
    argv: tuple[str, ...]  # sys.argv while it runs on a worker, as spawn gives
    token: str  # digest of path and source: one module per distinct script

    @property
    def module_name(self) -> str:
        return f"__farpool_main_{self.token}__"


class MainRef(NamedTuple):
    """How a pickler names what ``__main__`` defines: ``local`` as ``__main__.NAME``
    (a local pool, whose workers install the script as ``__main__``), else through the
    script's digest (a daemon's shared workers)."""

    script: MainScript | None
    local: bool


# In-process backends (inline): the names resolve in this very interpreter.
LOCAL = MainRef(None, True)

_cache_lock = threading.Lock()
_client_script: list[MainScript | None] = []


def client_script() -> MainScript | None:
    """This interpreter's main script, read once; None where there is no file to
    import on a worker (see the module docstring)."""
    with _cache_lock:
        if not _client_script:
            _client_script.append(_read_main())
        script = _client_script[0]
    if script is not None:
        main = sys.modules.get("__main__")
        if main is not None:
            # What workers send back names these modules (see the module docstring).
            sys.modules.setdefault(LOCAL_NAME, main)
            sys.modules.setdefault(script.module_name, main)
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
        compile(source, path, "exec")
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None  # not a Python source file we can run elsewhere
    import hashlib

    token = hashlib.blake2b(path.encode() + b"\0" + data, digest_size=8).hexdigest()
    return MainScript(path, source, package, tuple(sys.argv), token)


def main_reference(obj: Any, ref: MainRef) -> Any:
    """A pickler's reduction for ``obj`` if it is a function or class ``__main__``
    defines at a name; None otherwise. NotImplemented means: pickle it as a global."""
    if getattr(obj, "__module__", None) != "__main__":
        return None
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<" in qualname:
        return None  # a lambda or a nested function: by value
    found: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not obj:
        return None
    if ref.local:
        return NotImplemented
    assert ref.script is not None
    return _main_attr, (ref.script.token, qualname)


def with_main(script: MainScript, inner: Any) -> bytes:
    """A task function's blob as it travels to a daemon's worker, with the script it
    may refer to. ``inner`` is the function's own blob, or a callable whose pickle
    loads nothing of the script before it is called (``InitializedCall``)."""
    import pickle

    return pickle.dumps(_WithMain(script, inner), protocol=5)


class _WithMain:
    def __init__(self, script: MainScript, inner: Any) -> None:
        self.script = script
        self.inner = inner

    def __reduce__(self) -> tuple[Any, ...]:
        return _bind, (tuple(self.script), self.inner)


class _MainBound:
    """A task function run with its client's script as ``__main__`` (so ``pickle.loads``
    in a task finds the script's classes, as under the stdlib)."""

    __slots__ = ("fn", "module")

    def __init__(self, module: types.ModuleType, fn: Callable[..., Any]) -> None:
        self.module = module
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modules = sys.modules
        before = modules.get("__main__")
        modules["__main__"] = self.module
        try:
            return self.fn(*args, **kwargs)
        finally:
            if before is not None:
                modules["__main__"] = before


def _bind(script: tuple[Any, ...], inner: Any) -> _MainBound:
    module = _load(MainScript(*script))
    if isinstance(inner, bytes):  # unpickled only now that the module it may name exists
        import pickle

        inner = pickle.loads(inner)
    return _MainBound(module, inner)


def _main_attr(token: str, qualname: str) -> Any:
    module = sys.modules.get(f"__farpool_main_{token}__")
    if module is None:
        raise LookupError(f"the client's main script ({token}) never reached this worker")
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


_load_lock = threading.RLock()


def _load(script: MainScript, name: str | None = None) -> types.ModuleType:
    """The module for ``script``, made once per process; its code runs on first use."""
    name = name or script.module_name
    with _load_lock:
        module = sys.modules.get(name)
        if module is None or getattr(module, "__farpool_token__", None) != script.token:
            module = _lazy_module(script, name)
            sys.modules[name] = module
        return module


def install_local(script: MainScript) -> None:
    """In a local worker process: the script becomes ``__main__`` and ``__mp_main__``,
    run on first use, with the client's ``sys.argv`` as spawn gives."""
    sys.argv[:] = script.argv
    module = _load(script, LOCAL_NAME)
    sys.modules["__main__"] = module


def _lazy_module(script: MainScript, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = script.path
    module.__package__ = script.package
    module.__farpool_token__ = script.token  # type: ignore[attr-defined]
    failure: list[BaseException] = []

    def run_script(attr: str) -> Any:
        # PEP 562: called only for a name the module lacks; the first one runs the script.
        # Not for a dunder: tools probe modules for those (__path__, __wrapped__...).
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        with _load_lock:
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


def _run(script: MainScript, module: types.ModuleType, failure: list[BaseException]) -> None:
    argv = sys.argv[:]
    sys.argv[:] = script.argv
    try:
        exec(compile(script.source, script.path, "exec"), vars(module))
    except BaseException as exc:  # noqa: BLE001 - kept: every use reports it
        failure.append(exc)
    finally:
        sys.argv[:] = argv
