"""A crash the pool heals is the user's news only through that task's WorkerLost:
nothing above WARNING reaches the logs (concurrent.futures' own logger included)."""

import logging
import os

import pytest

import farpool


def _maybe_die(i):
    if i % 20 == 7:
        os._exit(3)
    return i


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING + 1)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.timeout(120)
def test_requeued_tasks_after_crashes_log_nothing_above_warning(capfd):
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with farpool.ProcessPoolExecutor(2) as ex:
            futures = [ex.submit(_maybe_die, i) for i in range(200)]
            outcomes = [f.exception(timeout=90) for f in futures]
    finally:
        root.removeHandler(handler)
    lost = [i for i, e in enumerate(outcomes) if e is not None]
    assert lost, "no task died: the test exercised nothing"
    assert all(isinstance(outcomes[i], farpool.WorkerLost) for i in lost)
    # A dying task fails; so may tasks it finished earlier whose results its worker
    # held back in a batch (documented: "before it reported the result"). The others,
    # prefetched by the dying worker and requeued, return their values.
    dying = {i for i in range(200) if i % 20 == 7}
    assert dying <= set(lost)
    assert all("before it reported" in str(outcomes[i]) for i in set(lost) - dying)
    assert [futures[i].result() for i in range(200) if i not in lost] == [
        i for i in range(200) if i not in lost]
    assert [r.getMessage() for r in handler.records] == []
    assert "unexpected state" not in capfd.readouterr().err
