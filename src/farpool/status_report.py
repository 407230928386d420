"""What a scheduler's STATUS answers: the full report (operator and worker keys,
`farpool status`), or totals for a client key (no peer's id, pid or host name)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .protocol import PeerRole

if TYPE_CHECKING:
    from .scheduler import Scheduler

__all__ = ["COUNTERS", "printable", "status_report", "totals_report"]

#: What the scheduler's counters count, for `farpool status`.
COUNTERS = {
    "unknown": "messages from peers it did not know (usual after a restart, theirs or its own)",
    "refused": "HELLOs refused (key not authorized, a key's role, or versions)",
    "malformed": "messages it could not read, dropped",
    "rejected": "tasks refused (function caches out of step)",
    "workers_lost": "worker processes that died (their hosts said so)",
    "clients_timed_out": "clients that stopped answering",
    "supervisors_timed_out": "worker hosts that stopped answering",
}


def status_report(scheduler: Scheduler) -> dict[str, Any]:
    """What ``farpool status`` shows: the session, the peers, the workers, the counters."""
    d = scheduler.dispatcher
    peers = scheduler.peers
    workers = []
    for worker_id, slot in d.workers.items():
        peer = peers.get(worker_id)
        owner = peers.get(peer.supervisor) if peer else None
        workers.append({"id": worker_id.hex(), "name": peer.name if peer else worker_id.hex(),
                        "pid": slot.info.get("pid"), "host": owner.name if owner else "",
                        "slots": slot.slots, "held": len(slot.held), "retiring": slot.retiring})
    return {
        "session": scheduler.session, "address": scheduler.address,
        "uptime": round(time.time() - scheduler.started, 1),
        "clients": sum(p.role == PeerRole.CLIENT for p in peers.values()),
        "client_list": [{"name": p.name, "pid": p.info.get("pid"), "unfinished": len(p.tasks)}
                        for p in peers.values() if p.role == PeerRole.CLIENT],
        "supervisors": [{"name": p.name, "workers": len(p.workers), "retiring": p.retiring}
                        for p in peers.values() if p.role == PeerRole.SUPERVISOR],
        "workers": workers,
        "slots": sum(s.slots for s in d.workers.values()),
        "queued": d.queued, "running": d.in_flight(), "done": d.done,
        **{k: v for k, v in sorted(scheduler.counters.items())},
    }


def totals_report(scheduler: Scheduler, key: bytes | None) -> dict[str, Any]:
    """STATUS for a client key: totals, and its own unfinished tasks; no peer's id, pid
    or host name."""
    d = scheduler.dispatcher
    peers = scheduler.peers.values()
    return {
        "session": scheduler.session, "address": scheduler.address,
        "uptime": round(time.time() - scheduler.started, 1),
        "clients": sum(p.role == PeerRole.CLIENT for p in peers), "supervisors": [],
        "workers": [{"slots": s.slots, "held": len(s.held)} for s in d.workers.values()],
        "slots": sum(s.slots for s in d.workers.values()),
        "queued": d.queued, "running": d.in_flight(), "done": d.done,
        "yours": sum(len(p.tasks) for p in peers if p.role == PeerRole.CLIENT and p.key == key),
    }


def printable(text: Any) -> str:
    """Peer-supplied text for a terminal: control characters (escape sequences) shown
    as escapes, never sent raw."""
    text = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
