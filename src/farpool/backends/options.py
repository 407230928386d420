"""The one place that validates executor options, for every backend.

Each check raises what the stdlib's pools raise for the same mistake (``TypeError``
for a wrong type, ``ValueError`` for a wrong value), before anything is started: a
bad option never leaves a pool, a connection or a cluster behind. ``check_known``
turns an unknown keyword into a ``TypeError`` that names the options the backend
takes, rather than Python's bare "unexpected keyword argument".
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def check_max_workers(max_workers: Any, default: T) -> int | T:
    """``max_workers`` as the stdlib checks it; None gives ``default``."""
    if max_workers is None:
        return default
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
    if max_workers <= 0:
        raise ValueError("max_workers must be greater than 0")
    return max_workers


def check_initializer(initializer: Any) -> None:
    """An initializer is None or a callable."""
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")


def check_retries(retries: Any) -> None:
    """How often a task may run again after its worker died: an int, 0 to MAX_RETRIES."""
    from ..protocol import MAX_RETRIES

    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be an int from 0 to {MAX_RETRIES}, not {retries!r}")


def check_max_tasks_per_child(value: Any) -> None:
    """None, or the number of tasks after which a worker process is replaced (>= 1)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("max_tasks_per_child must be an int")
    if value <= 0:
        raise ValueError("max_tasks_per_child must be >= 1")


def check_passed_on(scheme: str, options: Mapping[str, Any], own: Sequence[str],
                    chain: Sequence[Callable[..., Any]], to: str, *,
                    private_ok: bool = False) -> None:
    """Options a backend passes on to its engine (``chain``: the callables they reach,
    in order, each passing its ``**kwargs`` to the next) must be ones some of them
    takes: a ``TypeError`` naming the option now, not the engine's error from deep in
    its start-up. Unchecked when the last callable still takes any ``**kwargs``;
    ``private_ok``: names starting with ``_`` pass (Ray's internal options)."""
    known: set[str] = set()
    open_ended = False
    for target in chain:
        parameters = inspect.signature(target).parameters.values()
        known.update(p.name for p in parameters if p.kind in (
            inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    if open_ended and not private_ok:
        return
    unknown = sorted(name for name in options
                     if name not in known and not (private_ok and name.startswith("_")))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise TypeError(f"the {scheme!r} backend takes no option {names}: its own are "
                        f"{', '.join(sorted(own))}, and the others go to {to}")


def accepted_options(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword options ``factory(address, **options)`` takes; None if it takes any
    (a ``**kwargs`` it passes on, as Ray's does to ``ray.init``)."""
    names = []
    for parameter in list(inspect.signature(factory).parameters.values())[1:]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (inspect.Parameter.KEYWORD_ONLY,
                              inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
    return names


def check_known(scheme: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> None:
    """An option the backend does not take is a ``TypeError`` naming those it does."""
    accepted = accepted_options(factory)
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise TypeError(f"the {scheme!r} backend takes no option {names}; "
                        f"its options are: {', '.join(sorted(accepted))}")
