"""Which functions a receiver holds unpickled: the sender's side of the function cache.

A function used for many tasks travels once per receiver. The receiver keeps a bounded
LRU of unpickled functions (``serialize.FunctionCache``); the sender mirrors it here,
by key alone, so that it knows when a function's blob must go along. This module knows
nothing of pickles, so the scheduler, which routes blobs but never unpickles them, can
use it without loading cloudpickle.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from . import protocol

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


def _buffer(frame: Any) -> Any:
    return getattr(frame, "buffer", frame)


class ClientFunctions:
    """The function blobs one client sent, mirroring its ``SentFunctions``: same
    capacity and same order of use, so both sides agree on what is held."""

    def __init__(self, capacity: int = FN_CACHE_SIZE) -> None:
        self._blobs: OrderedDict[bytes, Any] = OrderedDict()
        self._capacity = capacity

    def put(self, key: bytes, blob: Any) -> None:
        self._blobs[key] = blob
        self._blobs.move_to_end(key)
        if len(self._blobs) > self._capacity:
            self._blobs.popitem(last=False)

    def get(self, key: bytes) -> Any | None:
        blob = self._blobs.get(key)
        if blob is not None:
            self._blobs.move_to_end(key)
        return blob

    def resolve(self, entry: protocol.TaskEntry, payload: list[Any]) -> tuple[Any, list[Any]] | str:
        """The function blob and argument frames of one task a client sent, or why it
        is rejected. A blob that rides along is kept (the client's cache has it now)."""
        if entry.fn_frames:
            blob = payload[0]
            # Keys name blobs by content, so workers share them across clients; a key
            # that is not its blob's digest would run one client's function in place
            # of another's.
            if hashlib.blake2b(_buffer(blob), digest_size=16).digest() != entry.fn_key:
                return "the function key is not the digest of its blob"
            self.put(entry.fn_key, blob)
        else:
            blob = self.get(entry.fn_key)
            if blob is None:
                return ("the scheduler does not hold this task's function "
                        "(client and scheduler caches disagree)")
        return blob, payload[entry.fn_frames:]
