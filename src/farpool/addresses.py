"""Scheduler addresses, checked before libzmq sees them (whose own word for every
mistake is "Invalid argument", and which waits out a connect to a port that cannot
exist)."""

from __future__ import annotations

import os
import socket
import stat

__all__ = ["check_address", "check_ipc_free"]


def check_address(address: object, *, bind: bool = False) -> str:
    """``address`` if it is a scheduler address (``tcp://HOST:PORT`` or
    ``ipc:///PATH``; to ``bind``, HOST may be ``*`` and PORT ``0`` or ``*``), else a
    ValueError that says what is wrong and what to write."""
    if not isinstance(address, str):
        raise ValueError(f"a scheduler address is a string, not {type(address).__name__}")
    if address.startswith("ipc://"):
        if len(address) <= len("ipc://"):
            raise ValueError(f"{address!r}: no path (use ipc:///PATH)")
        return address
    if not address.startswith("tcp://"):
        hint = f" (use tcp://{address})" if "://" not in address and ":" in address else ""
        raise ValueError(f"{address!r} is not a scheduler address: use tcp://HOST:PORT or "
                         f"ipc:///PATH{hint}")
    host, colon, port = address[len("tcp://"):].rpartition(":")
    if not colon or not host or "]" in port:
        raise ValueError(f"{address!r}: no port (use tcp://HOST:PORT, e.g. {address.rstrip('/')}:5555)")
    if bind and port == "*":
        return address
    if not port.isdigit():
        raise ValueError(f"{address!r}: port {port!r} is not a number")
    number = int(port)
    lowest = 0 if bind else 1
    if not lowest <= number <= 65535:
        raise ValueError(f"{address!r}: port {number} is out of range ({lowest}-65535)")
    return address


def check_ipc_free(address: str) -> None:
    """Before binding ``ipc:///PATH``: a ValueError if a live process already serves
    PATH. libzmq would unlink its socket file and bind anew, leaving the first scheduler
    running but unreachable. A file nobody listens on (left by a killed scheduler) is
    fine: libzmq replaces it."""
    path = address[len("ipc://"):]
    if not address.startswith("ipc://") or path.startswith("@"):
        return  # tcp:// clashes are caught by bind; abstract names cannot be stolen
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:
            return  # refused: nobody listens there any more
    raise ValueError("another process (a running scheduler?) serves this path; "
                     "stop it first, or bind another path")
