"""The dispatcher's decisions, with no sockets and no processes: which worker gets a
task, how much it may hold ahead (prefetch only for functions measured short), that
clients take turns, what the run-time table learns, and how a dead worker's tasks are
sorted into failed and requeued."""

from __future__ import annotations

import pytest

from farpool import dispatch
from farpool.dispatch import (
    MAX_PREFETCH,
    NO_PREFETCH_ABOVE,
    PREFETCH_WINDOW,
    Dispatcher,
    Task,
    WorkerSlot,
    plan_loss,
    sort_lost,
)

SHORT = b"s" * 16  # a function measured to be short
SLOW = b"S" * 16  # a function measured to be slow
NEW = b"n" * 16  # a function never timed


def task(task_id, client=b"", fn_key=NEW):
    return Task(task_id, fn_key, None, [], client=client)


def ids(tasks):
    return [t.task_id for t in tasks]


def batches(dispatcher):
    """assign() as {worker id: task ids}, checking the queued count as it goes."""
    out = {}
    for worker, batch in dispatcher.assign():
        assert worker.worker_id not in out  # one batch per worker
        out[worker.worker_id] = ids(batch)
    assert_counts(dispatcher)
    return out


def assert_counts(dispatcher):
    assert dispatcher.queued == sum(len(q) for q in dispatcher.queues.values())
    assert dispatcher.in_flight() == sum(len(w.held) for w in dispatcher.workers.values())


def timed(dispatcher, fn_key, seconds):
    """Teach the dispatcher a function's run time (the first sample sets the average)."""
    dispatcher.fn_seconds[fn_key] = seconds


# -- place -----------------------------------------------------------------------------
def test_place_gives_a_task_to_the_first_worker_with_a_free_slot():
    d = Dispatcher()
    first, second = d.add_worker("a"), d.add_worker("b", slots=2)
    assert d.place(task(1)) is first
    assert d.place(task(2)) is second  # "a" is full
    assert d.place(task(3)) is second
    assert d.place(task(4)) is None  # every slot taken: the caller queues it
    assert ids(first.held.values()) == [1] and ids(second.held.values()) == [2, 3]
    assert d.in_flight() == 3 and d.queued == 0


def test_place_with_no_workers_returns_none():
    assert Dispatcher().place(task(1)) is None


def test_place_never_jumps_ahead_of_queued_tasks():
    d = Dispatcher()
    worker = d.add_worker("a", slots=4)
    d.submit(task(1))
    assert d.place(task(2)) is None
    assert not worker.held  # left for assign(), which keeps the queue's order


def test_place_uses_only_free_slots_never_prefetch():
    d = Dispatcher()
    timed(d, SHORT, PREFETCH_WINDOW / 100)
    d.add_worker("a")
    assert d.place(task(1, fn_key=SHORT)) is not None
    assert d.place(task(2, fn_key=SHORT)) is None


def test_place_stops_when_a_workers_max_tasks_budget_is_used():
    d = Dispatcher()
    worker = d.add_worker("a", slots=4, max_tasks=2)
    assert d.place(task(1)) is worker and worker.tasks_left == 1
    assert d.place(task(2)) is worker and worker.tasks_left == 0
    d.finished("a", 1, 0.1)
    d.finished("a", 2, 0.1)
    assert d.place(task(3)) is None  # free slots, but the worker will retire


def test_place_skips_a_worker_out_of_budget_for_the_next_one():
    d = Dispatcher()
    d.add_worker("spent", slots=2, max_tasks=0)
    fresh = d.add_worker("fresh")
    assert d.place(task(1)) is fresh


def test_a_retiring_worker_takes_no_task():
    d = Dispatcher()
    worker = d.add_worker("a", slots=2)
    worker.retiring = True
    assert d.place(task(1)) is None
    d.submit(task(2))
    assert batches(d) == {}
    assert d.queued == 1


# -- credit ----------------------------------------------------------------------------
def test_worker_credit_is_slots_plus_prefetch_minus_held_within_budget():
    worker = WorkerSlot("a", slots=2)
    assert worker.credit(0) == 2 and worker.credit(5) == 7
    worker.held = {1: task(1), 2: task(2), 3: task(3)}
    assert worker.credit(0) == 0  # over-full counts as none, not negative
    assert worker.credit(5) == 4
    worker.tasks_left = 1
    assert worker.credit(5) == 1
    worker.retiring = True
    assert worker.credit(5) == 0


def test_a_worker_always_has_at_least_one_slot():
    assert Dispatcher().add_worker("a", slots=0).slots == 1


# -- assign: prefetch ------------------------------------------------------------------
def test_assign_with_nothing_queued_or_no_workers_yields_nothing():
    d = Dispatcher()
    d.add_worker("a")
    assert batches(d) == {}
    d = Dispatcher()
    d.submit(task(1))
    assert batches(d) == {}
    assert d.queued == 1


def test_never_timed_tasks_get_no_prefetch_one_per_free_slot():
    d = Dispatcher()
    d.add_worker("a", slots=2)
    for i in range(10):
        d.submit(task(i))
    assert batches(d) == {"a": [0, 1]}
    assert d.queued == 8
    assert batches(d) == {}  # both slots busy: the rest wait in the queue


def test_short_tasks_are_prefetched_up_to_the_window():
    d = Dispatcher()
    ema = PREFETCH_WINDOW / 4  # four such tasks fill the window
    timed(d, SHORT, ema)
    assert d.prefetch() == 0  # nothing queued, nothing to judge by
    for i in range(20):
        d.submit(task(i, fn_key=SHORT))
    assert d.prefetch() == 4
    d.add_worker("a", slots=2)
    assert batches(d) == {"a": list(range(6))}  # two slots, four ahead
    assert d.queued == 14


def test_prefetch_is_capped_at_max_prefetch():
    d = Dispatcher()
    timed(d, SHORT, 0.0)  # instantaneous: the cap alone limits it
    d.add_worker("a")
    for i in range(MAX_PREFETCH + 10):
        d.submit(task(i, fn_key=SHORT))
    assert d.prefetch() == MAX_PREFETCH
    assert len(batches(d)["a"]) == 1 + MAX_PREFETCH


@pytest.mark.parametrize("ema", [
    NO_PREFETCH_ABOVE * 1.01,  # slow: no prefetch at all
    NO_PREFETCH_ABOVE,  # short, but one task already fills the window
    PREFETCH_WINDOW * 1.5,
])
def test_no_prefetch_for_tasks_longer_than_the_window(ema):
    d = Dispatcher()
    timed(d, SHORT, ema)
    d.add_worker("a", slots=3)
    for i in range(10):
        d.submit(task(i, fn_key=SHORT))
    assert d.prefetch() == 0
    assert batches(d) == {"a": [0, 1, 2]}


def test_short_means_measured_at_most_no_prefetch_above():
    d = Dispatcher()
    timed(d, SHORT, NO_PREFETCH_ABOVE)
    timed(d, SLOW, NO_PREFETCH_ABOVE * 1.01)
    assert d.short(SHORT)
    assert not d.short(SLOW)
    assert not d.short(NEW)  # never timed: not known to be short


def test_a_slow_task_goes_to_an_idle_worker_not_behind_a_busy_ones_task():
    d = Dispatcher()
    busy, idle = d.add_worker("busy"), d.add_worker("idle")
    timed(d, SLOW, 1.0)
    assert d.place(task(1, fn_key=SLOW)) is busy
    d.submit(task(2, fn_key=SLOW))
    assert batches(d) == {"idle": [2]}
    d.submit(task(3, fn_key=SLOW))
    assert batches(d) == {}  # no free slot anywhere: it waits in the queue, not on a worker
    assert d.queued == 1 and ids(busy.held.values()) == [1] and ids(idle.held.values()) == [2]


def test_a_never_timed_task_is_not_prefetched_behind_short_ones():
    """Prefetch judged by another client's short tasks does not carry a never-timed
    task onto a worker whose slot is busy."""
    d = Dispatcher()
    timed(d, SHORT, PREFETCH_WINDOW / 4)
    worker = d.add_worker("a")
    d.place(task(0, fn_key=SHORT))  # the one slot is busy
    for i in range(1, 4):
        d.submit(task(i, client=b"short", fn_key=SHORT))
    d.submit(task(10, client=b"new", fn_key=NEW))
    assert batches(d) == {"a": [1, 2, 3]}
    assert ids(d.queues[b"new"]) == [10] and d.queued == 1
    assert ids(worker.held.values()) == [0, 1, 2, 3]


def test_prefetch_stops_at_a_slow_task_keeping_one_clients_order():
    d = Dispatcher()
    timed(d, SHORT, PREFETCH_WINDOW / 100)
    timed(d, SLOW, 1.0)
    d.add_worker("a")
    for i, key in enumerate([SHORT, SHORT, SLOW, SHORT, SHORT]):
        d.submit(task(i, fn_key=key))
    # The free slot takes one, prefetch the next short one; the slow one is not
    # prefetched, and the short ones after it do not overtake it.
    assert batches(d) == {"a": [0, 1]}
    assert ids(d.queues[b""]) == [2, 3, 4]


def test_a_slow_task_may_take_a_free_slot_in_a_batch_of_short_ones():
    d = Dispatcher()
    timed(d, SHORT, PREFETCH_WINDOW / 100)
    timed(d, SLOW, 1.0)
    d.add_worker("a", slots=2)
    for i, key in enumerate([SHORT, SLOW, SHORT]):
        d.submit(task(i, fn_key=key))
    # Two free slots for the first two; nothing ahead of a slow task's slot.
    assert batches(d) == {"a": [0, 1]}
    d.finished("a", 0, PREFETCH_WINDOW / 100)
    assert batches(d) == {"a": [2]}


def test_assign_respects_max_tasks_and_counts_the_budget_down():
    d = Dispatcher()
    timed(d, SHORT, 0.0)
    worker = d.add_worker("a", slots=2, max_tasks=5)
    for i in range(10):
        d.submit(task(i, fn_key=SHORT))
    assert batches(d) == {"a": [0, 1, 2, 3, 4]}
    assert worker.tasks_left == 0 and d.queued == 5
    for i in range(5):
        d.finished("a", i, 0.0)
    assert batches(d) == {}


def test_assign_fills_workers_in_order_and_stops_when_the_queue_is_empty():
    d = Dispatcher()
    for name in "abc":
        d.add_worker(name)
    d.submit(task(1))
    d.submit(task(2))
    assert batches(d) == {"a": [1], "b": [2]}
    assert d.idle() is False and d.in_flight() == 2


def test_a_task_submitted_to_the_front_runs_first():
    d = Dispatcher()
    d.add_worker("a")
    d.submit(task(1))
    d.submit(task(2), front=True)  # e.g. requeued from a lost worker
    assert batches(d) == {"a": [2]}


# -- assign: fairness ------------------------------------------------------------------
def test_one_clients_long_queue_does_not_starve_anothers_single_task():
    d = Dispatcher()
    d.add_worker("a")
    for i in range(100):
        d.submit(task(i, client=b"big"))
    d.submit(task(1000, client=b"small"))
    assert batches(d) == {"a": [0]}
    d.finished("a", 0, 1.0)
    assert batches(d) == {"a": [1000]}  # next turn is the other client's
    d.finished("a", 1000, 1.0)
    assert batches(d) == {"a": [1]}
    assert b"small" not in d.queues and d.queued == 98


def test_clients_take_turns_across_workers():
    d = Dispatcher()
    for name in "abcd":
        d.add_worker(name)
    for i in range(10):
        d.submit(task(i, client=b"x"))
    for i in range(100, 102):
        d.submit(task(i, client=b"y"))
    assert batches(d) == {"a": [0], "b": [100], "c": [1], "d": [101]}


def test_a_prefetched_batch_is_shared_between_clients():
    d = Dispatcher()
    timed(d, SHORT, 0.0)
    d.add_worker("a", slots=1)
    for i in range(1000):
        d.submit(task(i, client=b"big", fn_key=SHORT))
    for i in range(2000, 2003):
        d.submit(task(i, client=b"small", fn_key=SHORT))
    (batch,) = batches(d).values()
    assert len(batch) == 1 + MAX_PREFETCH
    assert [i for i in batch if i >= 2000] == [2000, 2001, 2002]  # not stuck behind "big"
    big = [i for i in batch if i < 2000]
    assert big == list(range(len(big)))  # each client's own order kept


# -- finished: what the dispatcher learns ----------------------------------------------
def test_finished_returns_the_task_and_frees_its_slot():
    d = Dispatcher()
    worker = d.add_worker("a")
    t = task(1)
    d.place(t)
    assert d.finished("a", 1, 0.5) is t
    assert not worker.held and d.done == 1
    assert d.place(task(2)) is worker


def test_finished_for_an_unknown_worker_or_task_returns_none_and_learns_nothing():
    d = Dispatcher()
    d.add_worker("a")
    d.place(task(1))
    assert d.finished("nobody", 1, 0.5) is None
    assert d.finished("a", 99, 0.5) is None
    assert d.done == 0 and d.fn_seconds == {} and d.in_flight() == 1
    assert d.finished("a", 1, 0.5) is not None
    assert d.finished("a", 1, 0.5) is None  # answered twice: the second is ignored
    assert d.done == 1


def test_a_cancelled_task_negative_duration_teaches_nothing():
    d = Dispatcher()
    d.add_worker("a")
    d.place(task(1, fn_key=NEW))
    assert d.finished("a", 1, -1.0) is not None
    assert NEW not in d.fn_seconds and d.done == 1
    timed(d, SHORT, 0.001)
    d.place(task(2, fn_key=SHORT))
    d.finished("a", 2, -1.0)
    assert d.fn_seconds[SHORT] == 0.001


def test_run_time_is_a_moving_average_by_ema_weight():
    d = Dispatcher()
    d.add_worker("a")
    samples = [0.01, 0.02, 0.0, 0.0]
    want = None
    for i, seconds in enumerate(samples):
        d.place(task(i, fn_key=SLOW))
        d.finished("a", i, seconds)
        want = seconds if want is None else want + dispatch._EMA_WEIGHT * (seconds - want)
        assert d.fn_seconds[SLOW] == pytest.approx(want)
    assert d.fn_seconds[SLOW] == pytest.approx(0.012 * (1 - dispatch._EMA_WEIGHT) ** 2)


def test_one_slow_run_does_not_end_a_short_functions_prefetch_at_once():
    d = Dispatcher()
    d.add_worker("a")
    d.place(task(1, fn_key=SHORT))
    d.finished("a", 1, 0.0001)
    d.place(task(2, fn_key=SHORT))
    d.finished("a", 2, 0.02)  # one outlier: 0.0001 + 0.2 * (0.02 - 0.0001) < 0.005
    assert d.short(SHORT)


def test_the_table_of_timed_functions_is_forgotten_when_full():
    d = Dispatcher()
    d.add_worker("a")
    limit = dispatch._MAX_TIMED_FUNCTIONS
    for i in range(limit):
        d.place(task(i, fn_key=i.to_bytes(16, "big")))
        d.finished("a", i, 0.001)
    assert len(d.fn_seconds) == limit
    # A function already timed updates in place: nothing is forgotten.
    d.place(task(limit, fn_key=(0).to_bytes(16, "big")))
    d.finished("a", limit, 0.001)
    assert len(d.fn_seconds) == limit
    # A new one when full clears the table, then is timed alone.
    d.place(task(limit + 1, fn_key=NEW))
    d.finished("a", limit + 1, 0.5)
    assert d.fn_seconds == {NEW: 0.5}
    assert not d.short((1).to_bytes(16, "big"))  # forgotten: no prefetch until re-timed


# -- cancel, drop_client ---------------------------------------------------------------
def test_cancel_drops_only_queued_tasks_and_keeps_the_rest_in_order():
    d = Dispatcher()
    worker = d.add_worker("a")
    for i in range(5):
        d.submit(task(i, client=b"c"))
    assert batches(d) == {"a": [0]}
    dropped = d.cancel(b"c", {0, 1, 3, 99})
    assert ids(dropped) == [1, 3]  # 0 is held by the worker: not the queue's to drop
    assert ids(d.queues[b"c"]) == [2, 4] and d.queued == 2
    assert ids(worker.held.values()) == [0]
    assert_counts(d)


def test_cancel_for_an_unknown_client_or_nothing_queued_drops_nothing():
    d = Dispatcher()
    assert d.cancel(b"nobody", {1}) == []
    d.submit(task(1, client=b"c"))
    assert d.cancel(b"other", {1}) == []
    assert d.queued == 1


def test_a_cancelled_task_is_never_assigned():
    d = Dispatcher()
    d.add_worker("a", slots=4)
    for i in range(3):
        d.submit(task(i))
    d.cancel(b"", {1})
    assert batches(d) == {"a": [0, 2]}
    assert d.queued == 0


def test_a_client_that_cancelled_everything_does_not_hold_up_anothers_task():
    # The other client's task goes to the idle worker in the same assign(), not at the
    # scheduler's next message or heartbeat.
    d = Dispatcher()
    d.add_worker("a")
    d.submit(task(1, client=b"cancels"))
    d.submit(task(2, client=b"other"))
    assert ids(d.cancel(b"cancels", {1})) == [1]
    assert batches(d) == {"a": [2]}


def test_drop_client_forgets_its_queued_tasks_only():
    d = Dispatcher()
    worker = d.add_worker("a")
    for i in range(3):
        d.submit(task(i, client=b"gone"))
    d.submit(task(10, client=b"stays"))
    assert batches(d) == {"a": [0]}
    assert ids(d.drop_client(b"gone")) == [1, 2]
    assert b"gone" not in d.queues and d.queued == 1
    assert ids(worker.held.values()) == [0]  # a held task is answered as usual
    assert d.drop_client(b"gone") == [] and d.drop_client(b"never") == []
    assert d.queued == 1
    assert_counts(d)


# -- workers ---------------------------------------------------------------------------
def test_remove_worker_returns_its_held_tasks_oldest_first():
    d = Dispatcher()
    timed(d, SHORT, 0.0)
    d.add_worker("a", slots=2)
    for i in range(5):
        d.submit(task(i, fn_key=SHORT))
    batches(d)
    d.finished("a", 1, 0.0)
    assert ids(d.remove_worker("a")) == [0, 2, 3, 4]
    assert "a" not in d.workers and d.in_flight() == 0
    assert d.finished("a", 2, 0.0) is None  # a late answer from it is ignored
    assert d.remove_worker("a") == [] and d.remove_worker("never") == []


def test_add_worker_keeps_its_info_and_budget():
    d = Dispatcher()
    worker = d.add_worker("a", 3, max_tasks=7, info={"host": "h"})
    assert d.workers["a"] is worker
    assert (worker.slots, worker.tasks_left, worker.info) == (3, 7, {"host": "h"})
    assert d.add_worker("b").info == {} and d.add_worker("b").tasks_left is None


def test_idle_and_in_flight_follow_queued_and_held_tasks():
    d = Dispatcher()
    assert d.idle() and d.in_flight() == 0
    d.submit(task(1))
    assert not d.idle()  # queued, no worker yet
    d.add_worker("a")
    d.add_worker("b")
    d.submit(task(2))
    batches(d)
    assert not d.idle() and d.in_flight() == 2 and d.queued == 0
    d.finished("a", 1, 0.1)
    assert not d.idle() and d.in_flight() == 1
    d.finished("b", 2, 0.1)
    assert d.idle() and d.in_flight() == 0 and d.done == 2


# -- sort_lost -------------------------------------------------------------------------
def lost(held_ids, running, done):
    """sort_lost for a worker whose state record says (running, done)."""
    return tuple(ids(group) for group in sort_lost([task(i) for i in held_ids], (running, done)))


def lost_without_record(held_ids):
    return tuple(ids(group) for group in sort_lost([task(i) for i in held_ids], None))


def test_sort_lost_with_running_and_done_known():
    # Ran 1 and 2 (results unsent), died running 3, never began 4 and 5.
    assert lost([1, 2, 3, 4, 5], running=3, done=2) == ([3], [1, 2], [4, 5])


def test_sort_lost_with_only_running_known():
    assert lost([1, 2, 3], running=1, done=None) == ([1], [], [2, 3])


def test_sort_lost_with_only_done_known_the_worker_was_between_tasks():
    assert lost([1, 2, 3], running=None, done=1) == ([], [1], [2, 3])


def test_sort_lost_without_a_record_counts_the_first_held_as_running():
    # A whole host vanished: nothing says how far its worker got.
    assert lost_without_record([1, 2, 3]) == ([1], [], [2, 3])
    assert lost_without_record([]) == ([], [], [])


def test_sort_lost_with_a_record_of_nothing_run_requeues_everything():
    # The worker died before it began any task: none of them ran.
    assert lost([1, 2, 3], running=None, done=None) == ([], [], [1, 2, 3])


def test_sort_lost_keeps_run_order_within_each_group():
    groups = lost([5, 3, 9, 1, 7, 2], running=1, done=9)
    assert groups == ([1], [5, 3, 9], [7, 2])


def test_sort_lost_never_requeues_a_task_that_ran_before_the_running_one():
    # Task 1 ran and its result was held back while task 2 ran (a worker batches the
    # results of short tasks); the record shows only the running task. Task 1 fails
    # with WorkerLost rather than running a second time.
    assert lost([1, 2, 3], running=2, done=None) == ([2], [1], [3])


def test_sort_lost_requeues_everything_when_the_last_done_task_was_already_reported():
    # Task 1's result came back (so it is no longer held) and the worker died before
    # it began task 2: tasks 2 and 3 run elsewhere, the caller sees nothing.
    assert lost([2, 3], running=None, done=1) == ([], [], [2, 3])


# -- plan_loss: what a lost worker means, for the local pool and the scheduler alike --
def plan(held_ids, record, retries=0):
    held = [task(i) for i in held_ids]
    result = plan_loss(held, record, lambda _task: retries)
    return ids(result.failed_running), ids(result.failed_unreported), ids(result.requeue)


def test_a_lost_workers_running_task_fails_when_no_retry_is_allowed():
    assert plan([1], (1, None)) == ([1], [], [])


def test_a_lost_workers_running_task_is_retried_first_and_its_attempts_counted():
    held = [task(1), task(2)]
    result = plan_loss(held, (1, None), lambda _task: 1)
    assert ids(result.requeue) == [1, 2] and not result.failed_running
    assert held[0].attempts == 1 and held[1].attempts == 0


def test_a_lost_workers_retries_used_up_fail_the_task():
    lost = task(1)
    lost.attempts = 2
    result = plan_loss([lost, task(2)], (1, None), lambda _task: 2)
    assert ids(result.failed_running) == [1] and ids(result.requeue) == [2]
    assert lost.attempts == 2  # not counted past the limit


def test_results_held_back_in_a_batch_fail_as_unreported_never_run_twice():
    # Ran 1 and 2 (results held back for batching), died running 3; 4 never began.
    assert plan([1, 2, 3, 4], (3, 2), retries=5) == ([], [1, 2], [3, 4])


def test_prefetched_tasks_of_a_lost_worker_requeue_in_their_order():
    assert plan([1, 2, 3, 4], (1, None)) == ([1], [], [2, 3, 4])


def test_a_vanished_host_without_record_counts_its_first_task_as_running():
    assert plan([5, 6], None) == ([5], [], [6])


def test_retries_are_asked_per_task():
    held = [task(1, client=b"a"), task(2, client=b"b")]
    result = plan_loss(held, (1, None), lambda t: {b"a": 0, b"b": 3}[t.client])
    assert ids(result.failed_running) == [1] and ids(result.requeue) == [2]


def test_requeue_puts_a_lost_workers_tasks_ahead_of_the_queue_in_order():
    dispatcher = Dispatcher()
    dispatcher.submit(task(9))
    dispatcher.requeue([task(1), task(2)])
    dispatcher.add_worker(b"w", slots=3)
    assert batches(dispatcher) == {b"w": [1, 2, 9]}


def test_room_unplace_and_taking_everything_for_a_broken_pool():
    d = Dispatcher()
    assert not d.has_room()  # no worker yet
    d.add_worker(b"w", 1, max_tasks=2)
    assert d.has_room()
    first = task(1)
    worker = d.place(first)
    assert worker is not None and not d.has_room() and worker.tasks_left == 1
    d.unplace(worker, first)  # cancelled before it went: the slot and budget return
    assert d.has_room() and worker.tasks_left == 2 and not worker.held
    d.place(task(2))
    for i in (3, 4):
        d.submit(task(i, client=b"a"))
    d.submit(task(5, client=b"b"))
    assert ids(d.take_all(held=False)) == [3, 4, 5] and d.queued == 0
    assert b"w" in d.workers  # a thread pool breaking: its threads keep their tasks
    d.submit(task(6))
    assert ids(d.take_all(held=True)) == [6, 2] and not d.workers


def test_shutdown_cancels_queued_tasks_but_keeps_some_for_starting_workers():
    d = Dispatcher()
    for i in range(1, 6):
        d.submit(task(i))
    started = {4}  # requeued after its worker died: running already, cannot cancel
    cancelled = []

    def cancel(t):
        if t.task_id in started:
            return False
        cancelled.append(t.task_id)
        return True

    d.cancel_for_shutdown(2, cancel)
    assert cancelled == [3, 5]
    assert ids(d.take_all(held=False)) == [1, 2, 4] and d.queued == 0


def test_short_tasks_are_not_prefetched_behind_a_long_running_task():
    # One worker is in a long task (here, of a function never timed: a time.sleep(2)),
    # the other is idle: the short tasks all go to the idle one, none waits behind
    # the busy one.
    d = Dispatcher()
    timed(d, SHORT, PREFETCH_WINDOW / 4)
    d.add_worker(b"busy", slots=1)
    d.add_worker(b"idle", slots=1)
    d.submit(task(0, fn_key=NEW))
    assert batches(d) == {b"busy": [0]}
    for i in range(1, 11):
        d.submit(task(i, fn_key=SHORT))
    assert batches(d) == {b"idle": [1, 2, 3, 4, 5]}  # its free slot and four ahead
    assert d.queued == 5
    assert batches(d) == {}  # still nothing for the busy worker
    # A known-slow running task holds prefetch back the same way.
    timed(d, SLOW, NO_PREFETCH_ABOVE * 100)
    d2 = Dispatcher()
    d2.fn_seconds.update(d.fn_seconds)
    d2.add_worker(b"w", slots=1)
    d2.submit(task(20, fn_key=SLOW))
    for i in range(21, 25):
        d2.submit(task(i, fn_key=SHORT))
    assert batches(d2) == {b"w": [20]}
    assert d2.queued == 4
    # Once its long task is done, the worker takes short tasks ahead again.
    d2.finished(b"w", 20, NO_PREFETCH_ABOVE * 100)
    assert batches(d2) == {b"w": [21, 22, 23, 24]}


def test_a_worker_running_a_short_task_keeps_its_prefetch():
    d = Dispatcher()
    timed(d, SHORT, PREFETCH_WINDOW / 4)
    d.add_worker(b"w", slots=1)
    for i in range(10):
        d.submit(task(i, fn_key=SHORT))
    assert batches(d) == {b"w": [0, 1, 2, 3, 4]}
    d.finished(b"w", 0, PREFETCH_WINDOW / 4)
    assert batches(d) == {b"w": [5]}  # back to one running and four ahead


# -- a short function's slow call ------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed_short():
    """(dispatcher on a fake clock, the clock), with SHORT timed at a quarter window."""
    clock = Clock()
    d = Dispatcher(clock=clock)
    timed(d, SHORT, PREFETCH_WINDOW / 4)
    return d, clock


def test_nothing_waits_behind_a_short_functions_call_that_runs_long(timed_short):
    # After quick calls, a call of the same function that takes 1 s: what comes next
    # goes to the idle worker, not ahead onto the one still busy (was: 3.0 s for calls
    # of 1.0, 0.05, 1.0, 1.0 s on two workers instead of 2.0).
    d, clock = timed_short
    d.add_worker("a")
    d.submit(task(1, fn_key=SHORT))
    assert batches(d) == {"a": [1]}
    clock.now += 0.5  # task 1 still runs: past what a short call takes
    d.add_worker("b")
    for i in range(2, 12):
        d.submit(task(i, fn_key=SHORT))
    assert batches(d) == {"b": [2, 3, 4, 5, 6]}  # b runs 2 and holds 4 ahead; a none
    clock.now += 0.0001
    d.finished("a", 1, 0.5)
    # a is free again; the 0.5 s call moved the function's average past short.
    assert batches(d) == {"a": [7]}


def test_a_worker_in_a_short_call_that_just_began_still_gets_tasks_ahead(timed_short):
    d, clock = timed_short
    d.add_worker("a")
    for i in range(6):
        d.submit(task(i, fn_key=SHORT))
    assert batches(d) == {"a": [0, 1, 2, 3, 4]}  # one running, four ahead
    clock.now += NO_PREFETCH_ABOVE / 10
    d.finished("a", 0, 0.0001)
    assert batches(d) == {"a": [5]}


def test_idle_workers_are_served_before_any_task_is_handed_ahead(timed_short):
    d, clock = timed_short
    d.add_worker("busy")
    d.submit(task(0, fn_key=SHORT))
    assert batches(d) == {"busy": [0]}
    d.add_worker("idle")
    d.submit(task(1, fn_key=SHORT))
    assert batches(d) == {"idle": [1]}  # was: prefetched onto "busy", first in order


def test_tasks_handed_ahead_one_at_a_time_go_to_the_worker_holding_fewest(timed_short):
    d, _ = timed_short
    d.add_worker("a")
    d.add_worker("b")
    for i in range(4):  # as submit() sends them: one dispatch each
        d.submit(task(i, fn_key=SHORT))
        batches(d)
    assert [len(w.held) for w in d.workers.values()] == [2, 2]
