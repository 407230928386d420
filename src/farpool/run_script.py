"""``farpool run [--address ADDRESS] script.py [args...]``: an unmodified stdlib script,
its pools served by farpool.

The script runs as ``python script.py args...`` would run it (``__name__`` is
``"__main__"``, ``sys.argv`` and ``sys.path[0]`` as Python sets them), except that
``concurrent.futures.ProcessPoolExecutor`` is ``farpool.ProcessPoolExecutor``, which runs
on ``--address`` (else ``FARPOOL_ADDRESS``, else local processes); with ``--threads``,
``ThreadPoolExecutor`` is farpool's too (always threads of this process). The script's
own functions and local modules reach the workers as ``main_script`` and
``code_bundle`` describe.
"""

from __future__ import annotations

import argparse
import os
import sys


def run(args: argparse.Namespace) -> int:
    """Run ``args.script`` with the stdlib's pools replaced; its exit status."""
    import concurrent.futures
    import concurrent.futures.process
    import concurrent.futures.thread
    import runpy

    import farpool

    path = args.script
    if not os.path.isfile(path):
        print(f"farpool run: no such script: {path}", file=sys.stderr)
        return 2
    if args.address is not None:
        from .backends import SCHEMES, open_backend, scheme_of  # noqa: F401 - checks the scheme at once

        if scheme_of(args.address) not in SCHEMES:
            print(f"farpool run: unknown address {args.address!r} (one of: "
                  f"{', '.join(sorted(SCHEMES))})", file=sys.stderr)
            return 2
        os.environ["FARPOOL_ADDRESS"] = args.address
    concurrent.futures.ProcessPoolExecutor = farpool.ProcessPoolExecutor  # type: ignore[misc]
    concurrent.futures.process.ProcessPoolExecutor = farpool.ProcessPoolExecutor  # type: ignore[misc]
    if args.threads:
        concurrent.futures.ThreadPoolExecutor = farpool.ThreadPoolExecutor  # type: ignore[misc]
        concurrent.futures.thread.ThreadPoolExecutor = farpool.ThreadPoolExecutor  # type: ignore[misc]
    sys.argv[:] = [path, *args.args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return 0
