"""The remote client's socket to a scheduler, and the name it gives itself."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from typing import Any

import zmq

from .. import protocol

LIVENESS = 5  # missed heartbeats before the scheduler counts as gone


def default_name() -> str:
    """``script.py@host:pid``: what an operator can tell a client by."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not script or script in ("-c", "-m", "__main__.py"):
        script = "python"
    return f"{script}@{socket.gethostname()}:{os.getpid()}"[:200]


def connect(ctx: zmq.Context, address: str, heartbeat: float,
             curve: Any) -> tuple[zmq.Socket, zmq.Socket]:
    """The DEALER to the scheduler, and a monitor of its handshakes: a refused key, or
    keys on one side only, is an error at once instead of silence."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 1000
    sock.identity = b"c" + secrets.token_hex(8).encode()
    sock.sndhwm = sock.rcvhwm = 0
    sock.maxmsgsize = protocol.DEFAULT_MAX_MESSAGE_BYTES
    ms = int(heartbeat * 1000)
    sock.heartbeat_ivl = ms
    sock.heartbeat_timeout = ms * LIVENESS
    from ..security import configure_client, watch_handshakes

    if curve is not None:
        server_public, pair = curve
        configure_client(sock, pair, server_public)
    monitor = watch_handshakes(sock)
    sock.connect(address)
    return sock, monitor
