"""The ``farpool`` command."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time
from collections.abc import Sequence


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _timed(label: str, run, numbers: list[int], results: dict[str, float]) -> list[bool]:
    from tqdm import tqdm

    start = time.perf_counter()
    out = []
    for value in tqdm(run(numbers), total=len(numbers), desc=f"{label:>28}", leave=True):
        out.append(value)
    results[label] = time.perf_counter() - start
    return out


def demo(args: argparse.Namespace) -> int:
    """Primality of large numbers: serial, stdlib ProcessPoolExecutor, farpool."""
    import farpool

    workers = args.workers or os.cpu_count() or 1
    base = 10**15
    numbers = [base + k for k in range(1, 2 * args.tasks, 2)][: args.tasks]
    times: dict[str, float] = {}
    serial = _timed("serial", lambda ns: map(_is_prime, ns), numbers, times)
    with cf.ProcessPoolExecutor(workers) as ex:
        stdlib = _timed(f"stdlib processes ({workers})",
                        lambda ns: ex.map(_is_prime, ns), numbers, times)
    with farpool.Executor(args.address, max_workers=workers) as ex:
        ours = _timed(f"farpool {ex.address} ({workers})",
                      lambda ns: ex.map(_is_prime, ns), numbers, times)
    if not serial == stdlib == ours:
        print("results differ between runs!", file=sys.stderr)
        return 1
    print(f"\n{sum(ours)} primes among {len(numbers)} numbers near 1e15\n")
    print(f"{'run':<34}{'wall (s)':>10}{'speed-up':>10}")
    for label, seconds in times.items():
        print(f"{label:<34}{seconds:>10.2f}{times['serial'] / seconds:>9.2f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farpool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="CPU-bound demo: serial vs stdlib vs farpool")
    p.add_argument("--address", default=None, help="backend address (default: FARPOOL_ADDRESS or processes)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--tasks", type=int, default=64)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
