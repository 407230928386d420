#!/usr/bin/env python
"""CPython 3.13's own concurrent.futures tests, pointed at farpool's drop-in classes.

    python scripts/conformance.py RUNNER [--python python3.13] [--venv DIR]
                                  [--watchdog SECONDS] [RUNNER ARGS...]

RUNNER is the conformance runner (``cpython_conformance.py``: it swaps the test
mixins' executors for ``farpool.ThreadPoolExecutor`` and ``ProcessPoolExecutor`` and
counts apart the tests that read the stdlib's private attributes); it can also come
from ``$FARPOOL_CONFORMANCE_RUNNER``. Arguments this script does not know go to the
runner (``--json OUT``, ``-k PATTERN``).

The tests need a Python 3.13 with its ``test`` package (``--python``, default
``python3.13``; with pyenv: ``PYENV_VERSION=3.13.0``). This script makes a virtual
environment with it (``--venv``, default ``farpool-conformance-py313`` in the temp
directory, kept for the next run), installs this checkout into it (editable), and
runs the runner from a scratch directory.

A test that fails while its tasks are still blocked (for example one that reads
``executor._threads`` before releasing the semaphore its tasks wait on) would hang in
its ``tearDown``'s ``shutdown(wait=True)`` for ever, as it would with the stdlib's
pools: ``--watchdog`` (default 120 s, 0 for none) fails a test that takes longer, so
the run always ends with its counts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the 3.13 virtual environment: arms an alarm around every test, then runs
# the runner as its own __main__ (it is not changed, only wrapped).
_WRAPPER = """
import runpy, signal, sys, unittest
seconds = int(sys.argv[1])
runner = sys.argv[2]

class TestTookTooLong(Exception):
    pass

def on_alarm(signum, frame):
    raise TestTookTooLong(f"conformance watchdog: the test ran over {seconds} s")

if seconds > 0:
    signal.signal(signal.SIGALRM, on_alarm)
    start, stop = unittest.TextTestResult.startTest, unittest.TextTestResult.stopTest

    def start_test(self, test):
        signal.alarm(seconds)
        start(self, test)

    def stop_test(self, test):
        signal.alarm(0)
        stop(self, test)

    unittest.TextTestResult.startTest = start_test
    unittest.TextTestResult.stopTest = stop_test
sys.argv = [runner, *sys.argv[3:]]
runpy.run_path(runner, run_name="__main__")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runner", nargs="?", default=os.environ.get("FARPOOL_CONFORMANCE_RUNNER"),
                        help="path to cpython_conformance.py (or $FARPOOL_CONFORMANCE_RUNNER)")
    parser.add_argument("--python", default="python3.13", help="a Python 3.13 with its test package")
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "farpool-conformance-py313"),
                        help="the virtual environment to make or reuse")
    parser.add_argument("--watchdog", type=int, default=120, help="seconds a test may take (0: no limit)")
    args, runner_args = parser.parse_known_args()
    if not args.runner:
        parser.error("give the runner's path, or set FARPOOL_CONFORMANCE_RUNNER")
    runner = os.path.abspath(args.runner)
    # The runner runs in a scratch directory: a --json path is the caller's.
    for i, arg in enumerate(runner_args):
        if arg.startswith("--json="):
            runner_args[i] = "--json=" + os.path.abspath(arg.partition("=")[2])
        elif arg == "--json" and i + 1 < len(runner_args):
            runner_args[i + 1] = os.path.abspath(runner_args[i + 1])
    if not os.path.isfile(runner):
        parser.error(f"no runner at {runner}")

    check = subprocess.run([args.python, "-c", "import sys, test.test_concurrent_futures; "
                            "assert sys.version_info[:2] == (3, 13), sys.version"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        print(f"{args.python} is not a Python 3.13 with its test package:\n{check.stderr}",
              file=sys.stderr)
        return 2
    python = os.path.join(args.venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([args.python, "-m", "venv", args.venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "-e", REPO], check=True)

    with tempfile.TemporaryDirectory(prefix="farpool-conformance-") as scratch:
        cmd = [python, "-c", _WRAPPER, str(args.watchdog), runner, "farpool", *runner_args]
        return subprocess.run(cmd, cwd=scratch).returncode


if __name__ == "__main__":
    sys.exit(main())
