"""What this machine allows before any executor runs: bare pyzmq round trips.

Each row times one small message there and back with nothing but pyzmq in between
(no pickling, no futures, no bookkeeping), in the shapes farpool's backends use:

    inproc threads      a thread hands a message to another thread and gets it back
                        (farpool's thread workers take their tasks this way)
    ipc direct          a process and a worker process over an ipc:// socket
                        (farpool's local worker processes)
    tcp direct          the same over loopback tcp, plain and with CURVE
    tcp broker          client -> ROUTER broker -> worker -> broker -> client, plain
                        and with CURVE (the shape of `farpool scheduler`)

A latency target below a row's figure cannot be met by any design of that shape on
this machine. Medians of NUMBER round trips, REPEAT times; quote them next to
scripts/bench.py's figures, from the same machine and the same hour.

    python scripts/floors.py [--number N] [--repeat R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

MESSAGE = b"x" * 100  # about a task header and a small pickle
START_TIMEOUT_MS = 30_000  # a peer process that does not come up fails the row


def _free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _server(sock: zmq.Socket, keys: tuple[bytes, bytes] | None) -> None:
    if keys is not None:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = keys


def _client(sock: zmq.Socket, server_public: bytes | None) -> None:
    if server_public is not None:
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()


def _echo(address: str, keys: tuple[bytes, bytes] | None) -> None:
    """A worker process: a ROUTER that sends every message back."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    _server(sock, keys)
    sock.bind(address)
    _echo_until_stop(ctx, sock)


def _echo_until_stop(ctx: zmq.Context, sock: zmq.Socket) -> None:
    """Send every message back until one ends in b"stop"; then close up."""
    try:
        while True:
            frames = sock.recv_multipart()
            if frames[-1] == b"stop":
                return
            sock.send_multipart(frames)
    finally:
        sock.close()
        ctx.term()


def _broker(front: str, back: str, keys: tuple[bytes, bytes] | None) -> None:
    """A broker process: clients on ``front``, one worker on ``back`` (its DEALER
    says hello first), messages passed through by identity."""
    ctx = zmq.Context()
    clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (clients, workers):
        sock.linger = 0
        _server(sock, keys)
    clients.bind(front)
    workers.bind(back)
    worker = workers.recv_multipart()[0]
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    try:
        while True:
            for sock, _ in poller.poll():
                if sock is clients:
                    frames = clients.recv_multipart()
                    if frames[-1] == b"stop":
                        workers.send_multipart([worker, b"stop"])
                        return
                    workers.send_multipart([worker, *frames])
                else:
                    clients.send_multipart(workers.recv_multipart()[1:])
    finally:
        clients.close()
        workers.close()
        ctx.term()


def _brokered_worker(back: str, server_public: bytes | None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    _client(sock, server_public)
    sock.connect(back)
    sock.send(b"hello")
    _echo_until_stop(ctx, sock)


def _time(sock: zmq.Socket, number: int, repeat: int) -> list[float]:
    """Medians (µs) of ``number`` round trips, ``repeat`` times, after a warm-up."""
    sock.rcvtimeo = START_TIMEOUT_MS  # the first reply waits for the peer to start
    sock.send(MESSAGE)
    sock.recv()
    sock.rcvtimeo = 10_000
    for _ in range(min(number, 500)):
        sock.send(MESSAGE)
        sock.recv()
    medians = []
    clock = time.perf_counter
    for _ in range(repeat):
        times = []
        for _ in range(number):
            start = clock()
            sock.send(MESSAGE)
            sock.recv()
            times.append(clock() - start)
        medians.append(statistics.median(times) * 1e6)
    return medians


def inproc_threads(number: int, repeat: int, _: str) -> list[float]:
    ctx = zmq.Context()
    here, there = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    here.bind("inproc://floor")
    there.connect("inproc://floor")

    def echo() -> None:
        while (frame := there.recv()) != b"stop":
            there.send(frame)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        return _time(here, number, repeat)
    finally:
        here.send(b"stop")
        thread.join(10)
        here.close(0)
        there.close(0)
        ctx.term()


def _with_processes(targets: list[tuple[Callable[..., None], tuple[Any, ...]]], connect: str,
                    server_public: bytes | None, number: int, repeat: int) -> list[float]:
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=fn, args=args, daemon=True) for fn, args in targets]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        for proc in procs:
            proc.start()
        _client(sock, server_public)
        sock.connect(connect)
        return _time(sock, number, repeat)
    finally:
        try:
            sock.send(b"stop", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        sock.close()
        ctx.term()


def ipc_direct(number: int, repeat: int, tmp: str) -> list[float]:
    address = f"ipc://{tmp}/echo"
    return _with_processes([(_echo, (address, None))], address, None, number, repeat)


def tcp_direct(number: int, repeat: int, _: str, curve: bool = False) -> list[float]:
    address = _free_tcp()
    keys = zmq.curve_keypair() if curve else None
    return _with_processes([(_echo, (address, keys))], address, keys and keys[0], number, repeat)


def tcp_broker(number: int, repeat: int, _: str, curve: bool = False) -> list[float]:
    front, back = _free_tcp(), _free_tcp()
    keys = zmq.curve_keypair() if curve else None
    public = keys and keys[0]
    return _with_processes([(_broker, (front, back, keys)), (_brokered_worker, (back, public))],
                           front, public, number, repeat)


ROWS: dict[str, Callable[[int, int, str], list[float]]] = {
    "inproc threads": inproc_threads,
    "ipc direct": ipc_direct,
    "tcp direct": tcp_direct,
    "tcp direct, CURVE": lambda n, r, t: tcp_direct(n, r, t, curve=True),
    "tcp broker": tcp_broker,
    "tcp broker, CURVE": lambda n, r, t: tcp_broker(n, r, t, curve=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=3000, help="round trips per repeat")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per row")
    parser.add_argument("--json", metavar="PATH", help="also write the medians here")
    args = parser.parse_args(argv)
    if args.number < 1 or args.repeat < 1:
        parser.error("--number and --repeat must be at least 1")
    if not zmq.has("curve"):
        parser.error("this libzmq has no CURVE support: the CURVE rows cannot run")
    results: dict[str, list[float]] = {}
    tmp = tempfile.mkdtemp(prefix="farpool-floors-")
    try:
        print(f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; "
              f"median µs of {args.number} round trips, {args.repeat} repeats\n")
        print("| shape | round trip, µs |\n|---|---:|")
        for name, row in ROWS.items():
            results[name] = medians = row(args.number, args.repeat, tmp)
            print(f"| {name} | {' / '.join(f'{m:.0f}' for m in medians)} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
