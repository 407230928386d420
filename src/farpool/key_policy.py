"""What a scheduler's peer may do, by the key it connected with. No sockets.

Each allowed key has a role (``farpool keygen --role``, see ``security.keys``):

- ``client``: says HELLO as a client (submits tasks, gets its own results) and sees
  only totals in STATUS;
- ``worker``: says HELLO as a worker host or worker process (runs tasks);
- ``operator``: both, and the full STATUS (this host's own key, and keys made before
  roles existed).

The scheduler learns a peer's key from each message's ZAP ``User-Id`` (CURVE only: on
``ipc://`` and ``--insecure`` nothing is enforced here, file permissions or nothing
guard the socket). It asks ``refusal`` at HELLO, checks every later message comes with
the key the peer joined with, and after each reload of the allow-list asks ``revoked``
of every peer, dropping those whose key is gone or may no longer do what they do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .protocol import PeerRole

log = logging.getLogger("farpool.scheduler")

__all__ = ["KEY_REFUSAL", "KeyPolicy"]

# Refusals for a key start with this word: a client tells them from version refusals.
KEY_REFUSAL = "key"

_MAY = {
    "client": frozenset({PeerRole.CLIENT}),
    "worker": frozenset({PeerRole.WORKER, PeerRole.SUPERVISOR}),
    "operator": frozenset({PeerRole.CLIENT, PeerRole.WORKER, PeerRole.SUPERVISOR}),
}


class KeyPolicy:
    """Roles of the allowed keys (``security.KeyRole`` by Z85 public key), or None when
    the socket has no CURVE (then every check passes)."""

    def __init__(self, roles: Mapping[bytes, Any] | None) -> None:
        self.roles = dict(roles) if roles is not None else None

    @classmethod
    def load(cls, key_dir: Any) -> KeyPolicy:
        """The policy of a scheduler's key directory; warns of key files with no role."""
        from .security import load_key_roles

        policy = cls(load_key_roles(key_dir))
        legacy = policy.legacy_names()
        if legacy:
            log.warning("key file(s) %s name no role: they may act as client and as worker "
                        "(operator). Re-issue them with `farpool keygen --role client` or "
                        "`--role worker` and delete the old files", ", ".join(legacy))
        return policy

    @property
    def enforced(self) -> bool:
        return self.roles is not None

    def update(self, roles: Mapping[bytes, Any]) -> None:
        """A reloaded allow-list."""
        if self.roles is not None:
            self.roles = dict(roles)

    def legacy_names(self) -> list[str]:
        """Key files without a role (operators until re-issued), for a warning."""
        return sorted(r.name for r in (self.roles or {}).values() if r.legacy)

    def refusal(self, key: bytes | None, role: Any) -> str | None:
        """Why a HELLO as ``role`` from ``key`` is refused; None if it is not."""
        if self.roles is None:
            return None
        entry = self.roles.get(key or b"")
        if entry is None:
            return f"{KEY_REFUSAL} not authorized (revoked?)"
        try:
            wanted = PeerRole(role)
        except ValueError:
            return None  # an unknown role: the scheduler's own refusal names it
        if wanted not in _MAY[entry.role]:
            return (f"{KEY_REFUSAL} {entry.name!r} is a {entry.role} key: it may not join as "
                    f"a {wanted.value} (farpool keygen --role)")
        return None

    def revoked(self, key: bytes | None, role: Any) -> str | None:
        """Why a peer that joined as ``role`` with ``key`` must go after a reload."""
        return self.refusal(key, role)

    def full_status(self, key: bytes | None) -> bool:
        """Whether STATUS from ``key`` shows peers (ids, pids, hosts), not only totals."""
        if self.roles is None:
            return True
        entry = self.roles.get(key or b"")
        return entry is not None and entry.role != "client"
