"""A plain concurrent.futures script: nothing in it knows farpool.

    python wordstats.py                                 # the stdlib's process pool
    farpool run wordstats.py                            # farpool's local processes
    farpool run --address tcp://head:5555 wordstats.py  # the worker daemons

Run by ``farpool run``, its functions, its globals and its helper module (textstats.py,
which the workers never had) go with the tasks.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

from textstats import Stats, analyse

STOP_WORDS: frozenset[str] = frozenset()


def load_stop_words(words: tuple[str, ...]) -> None:
    """The pool's initializer: a global every task then reads."""
    global STOP_WORDS
    STOP_WORDS = frozenset(words)


def document(seed: int) -> str:
    words = ["farpool", "pool", "task", "worker", "future", "result", "the", "a", "of"]
    return " ".join(words[(seed * 7 + i * i) % len(words)] for i in range(40 + seed % 13))


def summarise(seed: int) -> tuple[int, Stats]:
    stats = analyse(document(seed))
    common = tuple((w, n) for w, n in stats.common if w not in STOP_WORDS)
    return seed, Stats(stats.words, stats.longest, common)


def main(count: int) -> None:
    with ProcessPoolExecutor(max_workers=2, initializer=load_stop_words,
                             initargs=(("the", "a", "of"),)) as pool:
        futures = [pool.submit(summarise, seed) for seed in range(count)]
        results = dict(f.result() for f in as_completed(futures))
    total = sum(s.words for s in results.values())
    print(f"{count} documents, {total} words")
    for seed in sorted(results)[:3]:
        print(seed, results[seed])
    assert all(isinstance(s, Stats) for s in results.values())
    assert not any(w in ("the", "a", "of") for s in results.values() for w, _ in s.common)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
