"""The ``farpool`` command."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


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


def _probably_prime(n: int) -> bool:
    """Miller-Rabin with bases that make it exact below 3.3e24: picks the workload fast."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in small:
        return True
    if any(n % p == 0 for p in small):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_primes(start: int, count: int) -> list[int]:
    found: list[int] = []
    n = start | 1
    while len(found) < count:
        if _probably_prime(n):
            found.append(n)
        n += 2
    return found


def _workload(tasks: int) -> list[int]:
    """Numbers that each take trial division about the same time: primes near 1e13
    and products of two primes near 3e6 (whose smallest factor is as far to find)."""
    primes = _next_primes(10**13, (tasks + 1) // 2)
    factors = _next_primes(3_000_000, 2 * (tasks // 2) + 1)
    semiprimes = [factors[i] * factors[i + 1] for i in range(0, 2 * (tasks // 2), 2)]
    mixed = [n for pair in zip(primes, semiprimes, strict=False) for n in pair]
    return (mixed + primes[len(semiprimes):])[:tasks]


def _timed(label: str, run, numbers: list[int], results: dict[str, float]) -> list[bool]:
    from tqdm import tqdm

    start = time.perf_counter()
    out = []
    for value in tqdm(run(numbers), total=len(numbers), desc=f"{label:>28}", leave=True):
        out.append(value)
    results[label] = time.perf_counter() - start
    return out


def demo(args: argparse.Namespace) -> int:
    """Primality by trial division of large numbers: serial, stdlib ProcessPoolExecutor,
    farpool (on FARPOOL_ADDRESS or --address; local processes by default)."""
    import farpool

    workers = args.workers or os.cpu_count() or 1
    numbers = _workload(args.tasks)
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
    print(f"\n{sum(ours)} primes among {len(numbers)} numbers near 1e13\n")
    print(f"{'run':<34}{'wall (s)':>10}{'speed-up':>10}")
    for label, seconds in times.items():
        print(f"{label:<34}{seconds:>10.2f}{times['serial'] / seconds:>9.2f}x")
    return 0


DEFAULT_BIND = "tcp://127.0.0.1:5555"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _add_security(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("security")
    if server:
        g.add_argument("--key-dir", default=None,
                       help="key directory (default: $FARPOOL_KEY_DIR or ~/.config/farpool/keys)")
    else:
        g.add_argument("--key-file", default=None,
                       help="cluster key file from `farpool keygen` (default: $FARPOOL_KEY, "
                            "else this host's key directory)")
    g.add_argument("--insecure", action="store_true",
                   help="no CURVE keys on tcp:// (anyone who can connect can run code!)")


class _Version(argparse.Action):
    """``--version``: what a scheduler compares with its peers (protocol.version_conflicts),
    and the ZeroMQ versions; worked out only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import zmq

        from .protocol import version_info

        v = version_info()
        print(f"farpool {v['farpool']} (python {v['python']}, cloudpickle {v['cloudpickle']}, "
              f"protocol {v['protocol']}, pyzmq {zmq.pyzmq_version()}, libzmq {zmq.zmq_version()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``farpool`` argument parser (the deployment recipes are tested against it)."""
    # No abbreviated options: a shortened option in a deployed unit file would break
    # the day a new option shares its prefix.
    parser = argparse.ArgumentParser(prog="farpool", allow_abbrev=False,
                                     description="farpool: concurrent.futures, beyond one interpreter.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the versions a scheduler compares with its peers, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", allow_abbrev=False,
                       help="CPU-bound demo: serial vs stdlib vs farpool")
    p.add_argument("--address", default=None, help="backend address (default: FARPOOL_ADDRESS or processes)")
    p.add_argument("--workers", type=_positive, default=None)
    p.add_argument("--tasks", type=_positive, default=64)
    p.set_defaults(func=demo)

    p = sub.add_parser("run", allow_abbrev=False,
                       help="run a concurrent.futures script unchanged, its process pools "
                       "served by farpool")
    p.add_argument("--address", default=None,
                   help="where the pools run (default: FARPOOL_ADDRESS or processes)")
    p.add_argument("--threads", action="store_true",
                   help="serve ThreadPoolExecutor too (farpool's threads)")
    p.add_argument("script", help="the script, as you would give it to python")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    p.set_defaults(func=_run_script)

    p = sub.add_parser("scheduler", allow_abbrev=False,
                       help="run the scheduler daemon that clients and workers connect to")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"address to serve (default {DEFAULT_BIND})")
    p.add_argument("--heartbeat", type=_seconds, default=None,
                   help="seconds between liveness checks (default 1; a peer is lost after 5 missed)")
    p.add_argument("--drain-timeout", type=_seconds, default=30.0,
                   help="on SIGTERM, seconds running tasks may take to report before the "
                        "scheduler exits (default 30; a second SIGTERM exits at once)")
    _add_security(p, server=True)
    p.set_defaults(func=_run_scheduler)

    p = sub.add_parser("worker", allow_abbrev=False,
                       help="keep worker processes attached to a scheduler")
    p.add_argument("address", help="the scheduler's address, e.g. tcp://head:5555")
    p.add_argument("--nprocs", type=_positive, default=None,
                   help="worker processes to keep running (default: CPU count)")
    p.add_argument("--max-tasks-per-child", type=_positive, default=None,
                   help="replace a worker process after this many tasks")
    p.add_argument("--name", default=None, help="name shown by `farpool status` (default: host:pid)")
    p.add_argument("--heartbeat", type=_seconds, default=None, help="seconds between liveness checks")
    p.add_argument("--drain-timeout", type=_seconds, default=30.0,
                   help="on SIGTERM, seconds running tasks may take to finish before they are "
                        "stopped (default 30; a second SIGTERM stops them at once)")
    _add_security(p, server=False)
    p.set_defaults(func=_run_worker)

    p = sub.add_parser("cluster", allow_abbrev=False,
                       help="a scheduler and workers on this host, in the foreground")
    p.add_argument("--workers", type=_positive, default=None, help="worker processes (default: CPU count)")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"address to serve (default {DEFAULT_BIND})")
    _add_security(p, server=True)
    p.set_defaults(func=_run_cluster)

    p = sub.add_parser("status", allow_abbrev=False,
                       help="print a scheduler's workers, slots and task counts")
    p.add_argument("address", help="the scheduler's address")
    p.add_argument("--json", action="store_true", help="print the raw counters as JSON")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for an answer")
    _add_security(p, server=False)
    p.set_defaults(func=_run_status)

    p = sub.add_parser("keygen", allow_abbrev=False,
                       help="make a key file that lets another host's workers and clients in")
    p.add_argument("--name", default="client", help="name of the key (default: client)")
    p.add_argument("--role", default="client", choices=("client", "worker", "operator"),
                   help="what the key may do: submit tasks (client, the default), run them "
                   "(worker: a `farpool worker` host), or both and read the whole status "
                   "(operator)")
    p.add_argument("--key-dir", default=None, help="key directory (default: $FARPOOL_KEY_DIR or "
                   "~/.config/farpool/keys)")
    p.add_argument("--revoke", metavar="NAME", default=None,
                   help="revoke the key NAME instead: a running scheduler refuses it and cuts "
                        "its connections within 5 s")
    p.set_defaults(func=_run_keygen)
    return parser


def _run_script(args: argparse.Namespace) -> int:
    from .run_script import run

    return run(args)


def _run_scheduler(args: argparse.Namespace) -> int:
    from .daemons import run_scheduler

    return run_scheduler(args)


def _run_worker(args: argparse.Namespace) -> int:
    from .daemons import run_worker

    return run_worker(args)


def _run_cluster(args: argparse.Namespace) -> int:
    from .daemons import run_cluster

    return run_cluster(args)


def _run_status(args: argparse.Namespace) -> int:
    from .daemons import run_status

    return run_status(args)


def _run_keygen(args: argparse.Namespace) -> int:
    from .errors import SecurityError
    from .security import keygen, revoke

    try:
        if args.revoke is not None:
            removed = revoke(args.key_dir, args.revoke)
            print(f"revoked {args.revoke} (removed {', '.join(str(p) for p in removed)}); a "
                  "running scheduler cuts its connections within 5 s")
            return 0
        path = keygen(args.key_dir, name=args.name, role=args.role)
    except (ValueError, SecurityError) as exc:
        print(f"farpool keygen: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}\ncopy it (keep it private, mode 0600) to the other host and pass it as "
          "--key-file PATH or in $FARPOOL_KEY")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
