"""The liveness rules the scheduler, the worker daemon and the remote client share,
driven by a fake clock (plain numbers for ``now``): no sockets, no sleeps."""

from __future__ import annotations

import math

import pytest

from farpool.liveness import ReconnectWindow, heartbeat_limit, silent_too_long


def test_a_peer_is_gone_only_after_liveness_intervals_of_silence():
    # Heard at t=100, heartbeat 1 s, 5 missed beats allowed.
    assert not silent_too_long(100.0, 104.9, 1.0, 5)
    assert not silent_too_long(100.0, 105.0, 1.0, 5)  # exactly at the limit: not yet
    assert silent_too_long(100.0, 105.1, 1.0, 5)  # the heartbeat deadline passed


def test_a_peer_beating_slower_than_us_is_judged_by_its_own_interval():
    assert heartbeat_limit(1.0, 5, theirs=3.0) == 15.0
    assert not silent_too_long(0.0, 14.0, 1.0, 5, theirs=3.0)
    assert silent_too_long(0.0, 15.5, 1.0, 5, theirs=3.0)
    assert heartbeat_limit(2.0, 5, theirs=0.5) == 10.0  # ours is the slower


def test_the_reconnect_window_closes_after_its_timeout_from_the_loss():
    window = ReconnectWindow(10.0)
    window.lost(50.0)
    assert not window.expired(55.0) and window.waited(55.0) == 5.0
    assert not window.expired(60.0)
    assert window.expired(60.5)  # the window closed: the client gives up


def test_a_second_loss_keeps_the_first_moment():
    window = ReconnectWindow(10.0)
    window.lost(50.0)
    window.lost(58.0)  # a BYE while already lost does not reopen the window
    assert window.expired(60.5)


def test_a_welcome_reopens_a_fresh_window_for_the_next_loss():
    window = ReconnectWindow(10.0)
    window.lost(50.0)
    window.back()
    assert window.waited(100.0) == 0.0
    window.lost(100.0)
    assert not window.expired(109.0)
    assert window.expired(110.5)


def test_a_window_never_started_starts_when_first_checked():
    window = ReconnectWindow(2.0)
    assert not window.expired(7.0)  # starts now, never expires at once
    assert window.expired(9.5)


def test_a_zero_window_gives_up_at_the_first_tick_after_the_loss():
    window = ReconnectWindow(0.0)
    window.lost(1.0)
    assert not window.expired(1.0)
    assert window.expired(1.001)


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_a_negative_or_nan_window_is_refused(bad):
    with pytest.raises(ValueError, match="reconnect timeout"):
        ReconnectWindow(bad)


def test_a_log_line_peers_can_provoke_is_written_once_a_second_with_a_count():
    from farpool.log_limit import OncePerSecond

    limit = OncePerSecond()
    assert limit.passes(100.0) == 0  # the first one is written
    assert [limit.passes(100.0 + t) for t in (0.1, 0.5, 0.99)] == [None, None, None]
    assert limit.passes(101.0) == 3  # written, saying three were held back
    assert limit.passes(101.5) is None
    assert limit.passes(103.0) == 1
