"""The long-running commands: ``farpool scheduler``, ``worker``, ``cluster`` and
``status``. Process-level glue only (keys, signals, logging, what is printed); the
work is in ``scheduler.Scheduler`` and ``worker_daemon.Node``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import zmq

from . import protocol
from .addresses import check_address
from .errors import SecurityError
from .protocol import Kind
from .scheduler import DEFAULT_HEARTBEAT, Scheduler
from .status_report import COUNTERS, printable

log = logging.getLogger("farpool")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _on_signals(drain: Any, stop: Any) -> None:
    """SIGTERM or SIGINT drains; a second one stops at once."""
    signals = 0

    def handler(*_: Any) -> None:
        nonlocal signals
        signals += 1
        (drain if signals == 1 else stop)()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _server_keys(args: argparse.Namespace) -> Any:
    """The scheduler's keys, or None where none are needed or --insecure says so."""
    from .security import ensure_keys, requires_keys, warn_insecure

    if not requires_keys(args.bind):
        return None
    if args.insecure:
        warn_insecure(args.bind)
        return None
    return ensure_keys(args.key_dir)


def _client_curve(address: str, key_file: str | None, insecure: bool) -> Any:
    """What a worker or status client connects with: (server_public, KeyPair) or None."""
    if not address.startswith("tcp://"):
        return None
    if insecure:
        log.warning("connecting to %s without CURVE (--insecure)", address)
        return None
    from .security import client_keys

    return client_keys(key_file)


def _fail(message: str) -> int:
    print(f"farpool: {message}", file=sys.stderr, flush=True)
    return 1


def run_scheduler(args: argparse.Namespace) -> int:
    _setup_logging()
    try:
        check_address(args.bind, bind=True)
        keys = _server_keys(args)
        scheduler = Scheduler(args.bind, keys=keys, heartbeat=args.heartbeat or DEFAULT_HEARTBEAT)
    except (SecurityError, zmq.ZMQError, ValueError) as exc:
        return _fail(f"cannot serve {args.bind}: {exc}")
    _on_signals(lambda: scheduler.drain(args.drain_timeout), scheduler.stop)
    print(f"farpool scheduler serving {scheduler.address}", flush=True)
    if keys is not None:
        print(f"keys: {keys.key_dir} (workers and clients on this host find them; for other hosts "
              "run `farpool keygen`)", flush=True)
    try:
        scheduler.run()
    finally:
        scheduler.close()
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from .worker_daemon import Node

    _setup_logging()
    try:
        check_address(args.address)
        curve = _client_curve(args.address, args.key_file, args.insecure)
        node = Node(args.address, nprocs=args.nprocs or os.cpu_count() or 1,
                    max_tasks=args.max_tasks_per_child, name=args.name,
                    heartbeat=args.heartbeat or DEFAULT_HEARTBEAT, curve=curve,
                    grace=args.drain_timeout)
    except (SecurityError, zmq.ZMQError, ValueError) as exc:
        return _fail(f"cannot join {args.address}: {exc}")
    _on_signals(node.stop, node.stop_now)
    return node.run()


def run_cluster(args: argparse.Namespace) -> int:
    """A scheduler (in a thread) and a worker supervisor, both in this process."""
    from .worker_daemon import Node

    _setup_logging()
    try:
        check_address(args.bind, bind=True)
        keys = _server_keys(args)
        scheduler = Scheduler(args.bind, keys=keys)
        curve = None if keys is None else (keys.server.public, keys.client)
        node = Node(scheduler.address, nprocs=args.workers or os.cpu_count() or 1, curve=curve)
    except (SecurityError, zmq.ZMQError, ValueError) as exc:
        return _fail(f"cannot start a cluster on {args.bind}: {exc}")
    thread = threading.Thread(target=scheduler.run, name="farpool-scheduler", daemon=True)
    thread.start()
    _on_signals(node.stop, node.stop_now)
    print(f"farpool cluster: {node.nprocs} workers behind {scheduler.address}\n"
          f"use it with: FARPOOL_ADDRESS={scheduler.address}", flush=True)
    if keys is not None and args.key_dir:
        print(f"(and FARPOOL_KEY_DIR={keys.key_dir})", flush=True)
    try:
        return node.run()
    finally:
        scheduler.stop()
        thread.join(5)
        scheduler.close()


def query_status(address: str, *, curve: Any = None, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the scheduler at ``address`` for its counters; TimeoutError if it is silent."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.maxmsgsize = 16 * 1024 * 1024
    from .security import HandshakeVerdicts, configure_client, handshake_failures, watch_handshakes

    monitor = watch_handshakes(sock)
    verdicts = HandshakeVerdicts()
    try:
        if curve is not None:
            configure_client(sock, curve[1], curve[0])
        sock.connect(address)
        sock.send_multipart(protocol.encode(Kind.STATUS))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while not sock.poll(0):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from {address} within {timeout:g} s (is the "
                                   "scheduler running there, and the address right?)")
            poller.poll(int(left * 1000) + 1)
            for why in handshake_failures(monitor, verdicts):
                raise SecurityError(f"{address}: {why}")
        msg = protocol.decode(sock.recv_multipart())
        if msg.kind is not Kind.STATUS_REPLY:
            raise protocol.ProtocolError(f"expected STATUS_REPLY, got {msg.kind.name}")
        return msg.body[0]
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()


def run_status(args: argparse.Namespace) -> int:
    try:
        check_address(args.address)
        curve = _client_curve(args.address, args.key_file, args.insecure)
        info = query_status(args.address, curve=curve, timeout=args.timeout)
    except (SecurityError, TimeoutError, protocol.ProtocolError, zmq.ZMQError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"scheduler {info['address']}  session {info['session']}  up {info['uptime']} s")
    print(f"clients {info['clients']}  workers {len(info['workers'])}  slots {info['slots']}")
    print(f"tasks: queued {info['queued']}  running {info['running']}  done {info['done']}")
    for client in info.get("client_list", []):
        print(f"  client {printable(client['name'])}: {client['unfinished']} unfinished task(s)")
    for sup in info["supervisors"]:
        state = " (retiring)" if sup["retiring"] else ""
        print(f"  host {printable(sup['name'])}: {sup['workers']} worker processes{state}")
    extra = {k: v for k, v in info.items() if k not in {
        "session", "address", "uptime", "clients", "client_list", "supervisors", "workers",
        "slots", "queued", "running", "done"}}
    if extra:
        print("counters:")
        for key, value in extra.items():
            meaning = COUNTERS.get(key)
            print(f"  {printable(key)} {printable(value)}" + (f": {meaning}" if meaning else ""))
    return 0
