"""What a scheduler keeps across a restart: the decisions of rejoin.Reclaims, with a
fake clock and no sockets (the daemons' own test is in test_remote.py)."""

from __future__ import annotations

from farpool.dispatch import Task
from farpool.rejoin import Reclaims, task_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def task(task_id: int, client: bytes = b"c1") -> Task:
    return Task(task_id, b"fn", b"blob", [b"args"], client=client)


def test_a_task_has_the_same_id_in_every_session_and_no_other_shares_it():
    assert task_key(b"KEY", b"c1", 5) == task_key(b"KEY", b"c1", 5)
    ids = {task_key(key, client, n) for key in (None, b"KEY", b"OTHER")
           for client in (b"c1", b"c2") for n in range(1000)}
    assert len(ids) == 3 * 2 * 1000
    assert all(0 < i < 2 ** 63 for i in ids)


def test_a_result_nobody_claims_answers_the_resubmission_until_it_expires():
    clock = Clock()
    r = Reclaims(clock=clock, keep_seconds=60)
    assert r.unclaimed(7, 0, [b"result"], 1.5) is None
    kept = r.take_kept(7)
    assert kept is not None and (kept.status, kept.payload, kept.duration) == (0, [b"result"], 1.5)
    assert r.take_kept(7) is None  # taken once
    r.unclaimed(8, 0, [b"late"], 0.1)
    clock.now += 61
    assert r.take_kept(8) is None and r.dropped == 1
    assert r.kept_bytes == 0


def test_kept_results_are_bounded_in_count_and_bytes_oldest_first():
    r = Reclaims(clock=Clock(), max_kept=3, max_kept_bytes=10)
    for i in range(1, 5):
        r.unclaimed(i, 0, [b"xx"], 0.0)
    assert list(r.kept) == [2, 3, 4] and r.dropped == 1
    r.unclaimed(5, 0, [b"x" * 9], 0.0)  # 2 + 2 + 9 bytes > 10: the oldest go first
    assert list(r.kept) == [5] and r.kept_bytes == 9
    r.unclaimed(6, 0, [b"x" * 11], 0.0)  # larger than the cap alone: not kept
    assert 6 not in r.kept


def test_a_resubmission_waits_for_the_worker_that_runs_it():
    r = Reclaims(clock=Clock())
    r.expect(b"w1", b"sup", 7)
    r.expect(b"w2", b"sup", None)  # idle: nothing to wait for
    assert not r.park(task(9))  # runs nowhere: dispatch it
    waiting = task(7)
    assert r.park(waiting) and waiting.sent  # its future is running already
    assert r.unclaimed(7, 0, [b"done"], 2.0) is waiting
    assert 7 not in r.expected and not r.kept


def test_a_worker_that_dies_before_its_result_gives_back_the_waiting_task():
    r = Reclaims(clock=Clock())
    r.expect(b"w1", b"sup", 7)
    r.expect(b"w2", b"sup", 8)
    r.expect(b"w3", b"other", 9)
    waiting = [task(7), task(8), task(9)]
    assert all(r.park(t) for t in waiting)
    assert r.worker_lost(b"w1") == [waiting[0]]
    r.joined(b"w2")  # said HELLO: its loss comes as a worker's loss, not its host's
    assert r.supervisor_lost(b"sup") == []
    assert r.worker_lost(b"w2") == [waiting[1]]
    assert r.supervisor_lost(b"other") == [waiting[2]]
    assert not r.expected and not r.waiting and not r.rejoining


def test_a_client_that_leaves_stops_waiting():
    r = Reclaims(clock=Clock())
    r.expect(b"w1", b"sup", 7)
    mine, theirs = task(7, b"c1"), task(8, b"c2")
    r.expect(b"w2", b"sup", 8)
    assert r.park(mine) and r.park(theirs)
    assert r.cancel_waiting(b"c1") == [mine]
    assert r.unclaimed(7, 0, [b"r"], 1.0) is None and 7 in r.kept  # kept, for a return
    assert r.unclaimed(8, 0, [b"r"], 1.0) is theirs
