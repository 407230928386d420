"""The root of farpool's exceptions and the wire's errors: what a worker process needs
at start-up. ``farpool.errors`` re-exports them with the rest of the tree, whose
process-pool types need ``concurrent.futures.process`` (and so multiprocessing's
connection and queue modules: a sixth of a worker's start-up, for errors it rarely
raises)."""

from __future__ import annotations


class FarpoolError(Exception):
    """Root of the exceptions farpool raises itself."""


class ProtocolError(FarpoolError):
    """A message off the wire is malformed, truncated or of an unknown kind."""


class VersionMismatch(ProtocolError):
    """A peer's farpool, Python or cloudpickle version cannot read our payloads."""


class TaskInterrupted(BaseException):
    """Raised inside a running task that its pool is stopping (a time limit, or
    ``Executor.stop``), so its ``finally`` blocks and context managers run. A
    BaseException, as KeyboardInterrupt is: ``except Exception`` does not swallow it.
    A task that catches it anyway is killed once the grace is over."""


# Their public home (reprs, docs, pickles by reference) is farpool.errors.
for _cls in (FarpoolError, ProtocolError, VersionMismatch, TaskInterrupted):
    _cls.__module__ = "farpool.errors"
del _cls
