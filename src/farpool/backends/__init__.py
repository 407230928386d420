"""Backends: one module per way of running tasks, chosen by the address's scheme.

A backend is a small object (see ``base.Backend``): ``submit``, ``submit_many`` and
``shutdown``, plus a ``broken`` attribute. Modules are imported only when their scheme
is asked for, so ``import farpool`` never imports Dask or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Backend
from .options import check_known

__all__ = ["Backend", "SCHEMES", "open_backend", "scheme_of"]

# scheme -> "module:factory"; the factory takes (address, **options).
SCHEMES: dict[str, str] = {
    "processes": "farpool.backends.local:open_processes",
    "threads": "farpool.backends.local:open_threads",
    "inline": "farpool.backends.inline:InlineBackend",
    "tcp": "farpool.backends.remote:RemoteBackend",
    "ipc": "farpool.backends.remote:RemoteBackend",
    "dask": "farpool.backends.dask:DaskBackend",
    "ray": "farpool.backends.ray:RayBackend",
}


def scheme_of(address: str) -> str:
    if not isinstance(address, str):
        raise TypeError(f"address must be a string, not {type(address).__name__}")
    scheme = address.split("://", 1)[0] if "://" in address else address
    return scheme.strip().lower()


def open_backend(address: str, **options: Any) -> Backend:
    """The backend for ``address``; ValueError if its scheme is unknown."""
    scheme = scheme_of(address)
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(sorted(SCHEMES))
        hint = f"; for a scheduler, use tcp://{address}" if ":" in address and "://" not in address else ""
        raise ValueError(f"unknown farpool address {address!r}: the scheme must be one of {known}{hint}")
    module_name, _, factory = target.partition(":")
    module = importlib.import_module(module_name)
    open_it = getattr(module, factory)
    check_known(scheme, open_it, options)
    return open_it(address, **options)
