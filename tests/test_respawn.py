"""The respawn policy of the local pool and the worker daemon, with a fake clock."""

from __future__ import annotations

from farpool.respawn import MAX_DELAY, StartFailures, quick_death


def test_the_pool_gives_up_after_repeated_start_failures():
    policy = StartFailures(give_up=True)
    assert not policy.died(failed_start=True, now=1.0).give_up
    assert not policy.died(failed_start=True, now=2.0).give_up
    third = policy.died(failed_start=True, now=3.0)
    assert third.give_up and third.failures == 3


def test_a_worker_that_started_ends_the_run_of_failures():
    policy = StartFailures(give_up=True)
    policy.died(failed_start=True, now=1.0)
    policy.died(failed_start=True, now=2.0)
    policy.started()  # a HELLO came
    assert not policy.died(failed_start=True, now=3.0).give_up
    assert not policy.died(failed_start=True, now=4.0).give_up


def test_the_death_of_a_working_worker_is_respawned_at_once():
    policy = StartFailures(give_up=False)
    for now in (1.0, 2.0):
        policy.died(failed_start=True, now=now)
    respawn = policy.died(failed_start=False, now=10.0)
    assert respawn.at == 10.0 and respawn.failures == 0 and not respawn.give_up


def test_the_daemon_backs_off_doubling_up_to_a_cap_and_never_gives_up():
    policy = StartFailures(give_up=False)
    delays = []
    for step in range(12):
        now = 100.0 + step
        respawn = policy.died(failed_start=True, now=now)
        assert not respawn.give_up
        delays.append(respawn.at - now)
    assert delays[:2] == [0.0, 0.0]  # the first two failures respawn at once
    assert delays[2:6] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == MAX_DELAY and delays[-1] == MAX_DELAY


def test_a_quick_death_is_an_error_exit_within_two_seconds():
    assert quick_death(0.5, 1)
    assert quick_death(0.5, None)  # killed by a signal
    assert not quick_death(0.5, 0)  # a clean exit (retired) is no failure
    assert not quick_death(5.0, 1)  # it worked for a while
