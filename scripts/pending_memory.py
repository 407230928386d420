"""What a pending task costs in memory: farpool's pools beside the stdlib's.

Each pool runs in a fresh interpreter: one worker is kept busy, N tasks
(``fn(i)``, a small int argument) are submitted behind it, and the growth of the
process's peak resident set is divided by N.

    python scripts/pending_memory.py            # 100,000 tasks per pool
    python scripts/pending_memory.py --tasks 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

POOLS = {
    "stdlib-processes": "concurrent.futures.ProcessPoolExecutor(1)",
    "farpool-processes": "farpool.ProcessPoolExecutor(1)",
    "stdlib-threads": "concurrent.futures.ThreadPoolExecutor(1)",
    "farpool-threads": "farpool.ThreadPoolExecutor(1)",
}

# Run in the child: the blocker holds the one worker until every task is submitted.
CHILD = """
import concurrent.futures, gc, json, resource, sys, threading, time
import farpool

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def wait_for(path):
    import os
    while not os.path.exists(path):
        time.sleep(0.01)

n, flag = int(sys.argv[1]), sys.argv[2]
ex = {pool}
ex.submit(abs, 1).result(timeout=60)  # the worker is up, the paths are warm
blocker = ex.submit(wait_for, flag)
gc.collect()
before = peak()
futures = [ex.submit(abs, i) for i in range(n)]
gc.collect()
after = peak()
open(flag, "w").close()
assert [f.result(timeout=300) for f in futures[-3:]] == [n - 3, n - 2, n - 1]
blocker.result(timeout=60)
ex.shutdown()
print(json.dumps({{"bytes_per_task": (after - before) / n}}))
"""


def measure(pool: str, tasks: int) -> float:
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="farpool-mem-") as tmp:
        flag = os.path.join(tmp, "go")
        out = subprocess.run([sys.executable, "-c", CHILD.format(pool=POOLS[pool]), str(tasks), flag],
                             capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{pool}: {out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["bytes_per_task"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--only", default=None, help="comma-separated pools (default: all)")
    args = parser.parse_args()
    pools = list(POOLS) if args.only is None else args.only.split(",")
    print(f"`python scripts/pending_memory.py --tasks {args.tasks}`\n")
    print("| pool | bytes per pending task (peak RSS growth / tasks) |")
    print("|---|---:|")
    for pool in pools:
        print(f"| {pool} | {measure(pool, args.tasks):,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
