"""Helpers for wordstats.py: a sibling module, imported as any script imports one."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """What one document yields."""

    words: int
    longest: str
    common: tuple[tuple[str, int], ...]


def analyse(text: str) -> Stats:
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    words = [w for w in words if w]
    counts = Counter(words)
    return Stats(len(words), max(words, key=len, default=""), tuple(counts.most_common(3)))
