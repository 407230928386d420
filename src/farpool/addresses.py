"""Scheduler addresses, checked before libzmq sees them (whose own word for every
mistake is "Invalid argument", and which waits out a connect to a port that cannot
exist)."""

from __future__ import annotations

__all__ = ["check_address"]


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
