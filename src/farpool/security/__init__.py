"""Keys, CURVE and the ZAP authenticator: what makes a TCP endpoint safe to unpickle from.

Unpickling runs code, so every network-facing farpool socket uses CURVE *and* an
allow-list of client public keys checked by an authenticator: knowing the server's
public key is not enough, and a refused peer is dropped in the handshake, before
farpool reads a single frame from it. One module per role:

- :mod:`.curve`: whether this libzmq has CURVE and is recent enough (:func:`require_curve`).
- :mod:`.keys`: the key directory, cluster key files (``--key-file``, ``$FARPOOL_KEY``),
  ssh-like permission checks, :func:`keygen`.
- :mod:`.auth`: CURVE on sockets (:func:`configure_server`, :func:`configure_client`),
  the :class:`Authenticator` answering ZAP, and the ``--insecure`` warning.

Import from here (``from farpool.security import ...``); the submodules are the layout.
"""

from __future__ import annotations

from farpool.security.auth import (
    ZAP_DOMAIN,
    Authenticator,
    HandshakeVerdicts,
    ZapVerdict,
    configure_client,
    configure_server,
    describe_handshake_failure,
    handshake_failures,
    insecure_warning,
    requires_keys,
    warn_insecure,
    watch_handshakes,
    zap_verdict,
)
from farpool.security.auth import ZAP_ENDPOINT as ZAP_ENDPOINT
from farpool.security.curve import MIN_LIBZMQ, require_curve
from farpool.security.keys import KEY_DIR_ENV as KEY_DIR_ENV
from farpool.security.keys import KEY_ENV as KEY_ENV
from farpool.security.keys import (
    ROLES,
    ClusterKeys,
    KeyPair,
    KeyRole,
    client_keys,
    default_key_dir,
    ensure_keys,
    format_key_file,
    keygen,
    load_authorized,
    load_key_file,
    load_key_roles,
    parse_key_file,
    revoke,
    write_key_file,
)

__all__ = [
    "MIN_LIBZMQ",
    "ZAP_DOMAIN",
    "Authenticator",
    "ClusterKeys",
    "KeyPair",
    "ZapVerdict",
    "client_keys",
    "configure_client",
    "configure_server",
    "default_key_dir",
    "HandshakeVerdicts",
    "describe_handshake_failure",
    "handshake_failures",
    "ensure_keys",
    "format_key_file",
    "insecure_warning",
    "keygen",
    "load_authorized",
    "load_key_file",
    "load_key_roles",
    "KeyRole",
    "ROLES",
    "parse_key_file",
    "revoke",
    "require_curve",
    "requires_keys",
    "warn_insecure",
    "watch_handshakes",
    "write_key_file",
    "zap_verdict",
]
