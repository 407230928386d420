"""Whether this process's libzmq can secure a network socket: CURVE built in, and new enough.

Both :mod:`.keys` (generating a key pair) and :mod:`.auth` (configuring sockets and
answering ZAP) check it first, so it lives below both of them.
"""

from __future__ import annotations

import zmq

from farpool.errors import SecurityError

__all__ = ["MIN_LIBZMQ", "require_curve"]

#: libzmq 4.3.2 fixes CVE-2019-13132, a stack overflow any unauthenticated peer could
#: trigger in the CURVE handshake: older versions make CURVE an attack surface.
MIN_LIBZMQ = (4, 3, 2)


def require_curve() -> None:
    """Fail closed unless libzmq has CURVE and is at least 4.3.2.

    Raises :class:`~farpool.errors.SecurityError` naming the libzmq version found.
    """
    found = tuple(zmq.zmq_version_info())
    version = ".".join(str(part) for part in found)
    if not zmq.has("curve"):
        raise SecurityError(
            f"libzmq {version} was built without CURVE (libsodium), so farpool cannot "
            "encrypt or authenticate network sockets and refuses to open them; install a "
            "pyzmq wheel (its bundled libzmq has CURVE) or a libzmq built with libsodium")
    if found < MIN_LIBZMQ:
        raise SecurityError(
            f"libzmq {version} is older than 4.3.2: its CURVE handshake can be crashed or "
            "hijacked by an unauthenticated peer (CVE-2019-13132); upgrade pyzmq/libzmq")
