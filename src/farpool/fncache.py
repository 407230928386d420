"""Which functions a receiver holds unpickled: the sender's side of the function cache.

A function used for many tasks travels once per receiver. The receiver keeps a bounded
LRU of unpickled functions (``serialize.FunctionCache``); the sender mirrors it here,
by key alone, so that it knows when a function's blob must go along. This module knows
nothing of pickles, so the scheduler, which routes blobs but never unpickles them, can
use it without loading cloudpickle.
"""

from __future__ import annotations

from collections import OrderedDict

# How many distinct functions a worker keeps unpickled. Sender and receiver use the
# same size and the same access order, so they agree on what is cached.
FN_CACHE_SIZE = 256


class SentFunctions:
    """The sender's mirror of one receiver's ``FunctionCache``."""

    def __init__(self, capacity: int = FN_CACHE_SIZE) -> None:
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._capacity = capacity

    def needs(self, key: bytes) -> bool:
        """Record a use of ``key``; True if its blob must be sent along."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self._capacity:
            self._keys.popitem(last=False)
        return True
