"""A client's own code on a daemon's shared workers: its main script and local modules.

A script that imports a sibling module (``from mylib import score``) and runs unchanged
against ``tcp://`` daemons needs ``mylib`` on hosts where it was never installed. The
client collects its *local modules* (``BundleMaker``): those loaded from the main
script's directory tree, not from an installed location (site-packages, the Python
installation, a virtual environment), plus any named with ``ship_modules``. Their
source and the script's travel inside each function blob as a ``CodeBundle``, so once
per function and worker process.

On the worker, each bundle becomes a ``Namespace``: the script as a lazy ``__main__``
(see ``main_script``) and the modules, imported from the shipped source by a finder
placed first on ``sys.meta_path``. A daemon's worker process serves many clients, so a
namespace is swapped into ``sys.modules`` around each of its client's tasks (unpickling
the arguments, the call, pickling the result) and out again after: two clients'
``mylib`` or ``__main__`` never meet. Everything else (NumPy, the stdlib) is shared.

A compiled module in the tree cannot be shipped: a worker that lacks it fails the task
with an ImportError that names it and says to install it there.

This module runs inside workers: it imports nothing heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import pickle
import sys
import threading
import types
import uuid
from collections.abc import Iterable
from typing import Any, NamedTuple

from .main_script import LOCAL_NAME, MainScript, client_script, lazy_module

__all__ = ["BundleMaker", "CodeBundle", "InNamespace", "ShippedModule", "with_code"]

# Shipped source above this is refused: install such a project on the workers instead.
MAX_BUNDLE_BYTES = 8 << 20
# Each client process's namespaces are its own, even for identical code.
_CLIENT = uuid.uuid4().hex


class ShippedModule(NamedTuple):
    name: str
    path: str
    source: str | None  # None: compiled, cannot be shipped
    is_package: bool


class CodeBundle(NamedTuple):
    """What a client's functions may need on a worker besides installed packages."""

    token: str  # the namespace: one per client process (and main script)
    main: MainScript | None
    modules: tuple[ShippedModule, ...]
    digest: str  # of the contents: a bundle with modules imported since is another


# -- the client's side ------------------------------------------------------------------------


class BundleMaker:
    """The client's current bundle, made again only when ``sys.modules`` has grown.

    ``ship``: True finds local modules by themselves; False ships none (the script
    still goes); a list of module names or modules adds those (with their loaded
    submodules) to what is found.
    """

    def __init__(self, ship: bool | Iterable[Any] = True) -> None:
        if isinstance(ship, bool):
            self.auto, extra = ship, []
        elif isinstance(ship, (str, types.ModuleType)):
            raise TypeError("ship_modules must be True, False or a list of modules or names")
        else:
            self.auto, extra = True, list(ship)
        self.extra: list[str] = []
        for item in extra:
            name = item.__name__ if isinstance(item, types.ModuleType) else item
            if not isinstance(name, str) or not name:
                raise TypeError(f"ship_modules holds {item!r}: give module names or modules")
            if name not in sys.modules:
                raise ValueError(f"ship_modules names {name!r}, which is not imported here")
            self.extra.append(name)
        self.main = client_script()
        root = os.path.dirname(os.path.realpath(self.main.path)) if self.main else None
        self.root = root if self.auto else None
        self._seen = -1
        self._bundle: CodeBundle | None = None
        self._sources: dict[str, ShippedModule] = {}
        self._lock = threading.Lock()

    def current(self) -> CodeBundle | None:
        """The bundle to send with a function; None when there is nothing to ship."""
        with self._lock:
            if len(sys.modules) != self._seen:
                self._seen = len(sys.modules)
                self._bundle = self._make()
            return self._bundle

    def _make(self) -> CodeBundle | None:
        found = self._local_modules()
        if self.main is None and not found:
            return None
        modules = tuple(self._shipped(name, module) for name, module in sorted(found.items()))
        size = sum(len(m.source or "") for m in modules) + len(self.main.source if self.main else "")
        if size > MAX_BUNDLE_BYTES:
            biggest = sorted(modules, key=lambda m: -len(m.source or ""))[:3]
            raise ValueError(f"the local code to ship to the workers is {size >> 20} MiB (at most "
                             f"{MAX_BUNDLE_BYTES >> 20}; largest: {', '.join(m.name for m in biggest)}): "
                             "install it on the workers and pass ship_modules=False")
        import hashlib

        # The namespace stays the same as the client imports more local modules: the
        # worker adds them to it (Namespace.extend), and the globals the script's
        # functions (and the initializer) set there stay.
        token = hashlib.blake2b(f"{_CLIENT} {self.main.token if self.main else ''}".encode(),
                                digest_size=8).hexdigest()
        digest = hashlib.blake2b(repr([(m.name, m.path, m.source) for m in modules]).encode(),
                                 digest_size=8).hexdigest()
        return CodeBundle(token, self.main, modules, digest)

    def _local_modules(self) -> dict[str, types.ModuleType]:
        found: dict[str, types.ModuleType] = {}
        excluded = _installed_dirs()
        for name, module in list(sys.modules.items()):
            if not isinstance(module, types.ModuleType) or name in ("__main__", LOCAL_NAME):
                continue
            if name == "farpool" or name.startswith("farpool."):
                continue  # the workers run their own
            top = name.partition(".")[0]
            if top in self.extra:
                found[name] = module
                continue
            if self.root is None:
                continue
            path = getattr(module, "__file__", None)
            if not isinstance(path, str):
                continue
            real = os.path.realpath(path)
            if real.startswith(self.root + os.sep) and not _under(real, excluded):
                found[name] = module
        return found

    def _shipped(self, name: str, module: types.ModuleType) -> ShippedModule:
        path = getattr(module, "__file__", None) or ""
        cached = self._sources.get(name)
        if cached is not None and cached.path == path:
            return cached
        is_package = hasattr(module, "__path__")
        source: str | None = None
        if path.endswith(".py"):
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
            except (OSError, UnicodeDecodeError):
                source = None
        shipped = self._sources[name] = ShippedModule(name, path, source, is_package)
        return shipped


def _installed_dirs() -> tuple[str, ...]:
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return tuple(sorted(dirs))


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path == d or path.startswith(d + os.sep) for d in dirs)


def with_code(bundle: CodeBundle, inner: bytes) -> bytes:
    """A function blob (``inner``) as it travels to a daemon's worker, with the code it
    may need: unpickled there inside the bundle's namespace."""
    return pickle.dumps(_WithCode(bundle, inner), protocol=5)


class _WithCode:
    def __init__(self, bundle: CodeBundle, inner: bytes) -> None:
        self.bundle = bundle
        self.inner = inner

    def __reduce__(self) -> tuple[Any, ...]:
        return _bind, (self.bundle, self.inner)


# -- the worker's side ------------------------------------------------------------------------


class Namespace:
    """One client's code in a shared worker process, in ``sys.modules`` while entered."""

    def __init__(self, bundle: CodeBundle) -> None:
        self.sources = {m.name: m for m in bundle.modules}
        self.modules: dict[str, types.ModuleType] = {}
        if bundle.main is not None:
            main = lazy_module(bundle.main)
            self.modules["__main__"] = self.modules[LOCAL_NAME] = main
        self.names = frozenset(self.sources) | frozenset(self.modules)
        self._saved: list[dict[str, types.ModuleType] | None] = []
        self._before_install: dict[str, types.ModuleType] = {}

    def extend(self, bundle: CodeBundle) -> None:
        """Modules the client imported since: added (those loaded already stay)."""
        new = [m for m in bundle.modules if m.name not in self.sources]
        if new:
            self.sources.update((m.name, m) for m in new)
            self.names = self.names | {m.name for m in new}

    def __enter__(self) -> Namespace:
        if _installed[0] is self:
            self._saved.append(None)  # in place already (install)
            return self
        modules = sys.modules
        self._saved.append({n: modules.pop(n) for n in self.names if n in modules})
        modules.update(self.modules)
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        saved = self._saved.pop()
        if saved is None:
            return
        _active.remove(self)
        self._take_back()
        sys.modules.update(saved)

    def install(self) -> None:
        """Put this namespace in place and leave it there (an engine's worker, whose
        engine pickles a task's result after the task returned); another installed
        namespace is taken out first."""
        with _bind_lock:
            current = _installed[0]
            if current is self:
                return
            if current is not None:
                _active.remove(current)
                current._take_back()
                sys.modules.update(current._before_install)
            modules = sys.modules
            self._before_install = {n: modules.pop(n) for n in self.names if n in modules}
            modules.update(self.modules)
            _active.insert(0, self)
            _installed[0] = self

    def _take_back(self) -> None:
        """Move this namespace's modules (imported meanwhile too) out of sys.modules."""
        modules = sys.modules
        for name in self.names:
            module = modules.pop(name, None)
            if module is not None:
                self.modules[name] = module


class InNamespace:
    """A task function of a client with shipped code; the worker loop runs its tasks
    inside ``namespace``."""

    __slots__ = ("fn", "namespace")

    def __init__(self, namespace: Namespace, fn: Any) -> None:
        self.namespace = namespace
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


_namespaces: dict[str, Namespace] = {}
_active: list[Namespace] = []  # innermost last; the finder serves the innermost
_installed: list[Namespace | None] = [None]  # the one left in place (see install)
_bind_lock = threading.Lock()


def _bind(bundle: CodeBundle, inner: bytes) -> InNamespace:
    with _bind_lock:
        namespace = _namespaces.get(bundle.token)
        if namespace is None:
            namespace = _namespaces[bundle.token] = Namespace(bundle)
        else:
            namespace.extend(bundle)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    with namespace:
        return InNamespace(namespace, pickle.loads(inner))


class _ShippedFinder(importlib.abc.MetaPathFinder):
    """Imports the active namespace's modules from their shipped source."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not _active:
            return None
        shipped = _active[-1].sources.get(fullname)
        if shipped is None:
            return None
        if shipped.source is None:
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        return spec  # this host has it installed
            raise ImportError(f"{fullname} is a compiled module in the client's directory "
                              f"({shipped.path}), which farpool cannot ship: install it on the "
                              "workers", name=fullname)
        return importlib.util.spec_from_loader(fullname, _ShippedLoader(shipped),
                                               origin=shipped.path, is_package=shipped.is_package)


class _ShippedLoader(importlib.abc.InspectLoader):
    def __init__(self, shipped: ShippedModule) -> None:
        self.shipped = shipped

    def get_source(self, fullname: str) -> str | None:
        return self.shipped.source  # for tracebacks (linecache asks the loader)

    def is_package(self, fullname: str) -> bool:
        return self.shipped.is_package

    def exec_module(self, module: types.ModuleType) -> None:
        module.__file__ = self.shipped.path
        if self.shipped.is_package:
            module.__path__ = []  # its submodules come from the namespace too
        assert self.shipped.source is not None
        exec(compile(self.shipped.source, self.shipped.path, "exec"), vars(module))


_FINDER = _ShippedFinder()
