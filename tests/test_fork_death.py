"""A worker whose task forked a child (fork without exec) and then died is reported
lost at once, not when that child exits: the pool watches the process itself (a pidfd),
not the control socket the child inherited."""

import os
import signal
import time

import pytest

import farpool


def _fork_then_die(path):
    pid = os.fork()
    if pid == 0:  # the child: holds every descriptor the worker had, for 30 s
        time.sleep(30)
        os._exit(0)
    with open(path, "w") as f:
        f.write(str(pid))
    os._exit(5)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux's pidfd")
@pytest.mark.timeout(60)
def test_worker_lost_comes_while_the_forked_child_lives(tmp_path):
    marker = tmp_path / "child.pid"
    child = None
    try:
        with farpool.ProcessPoolExecutor(1) as ex:
            future = ex.submit(_fork_then_die, str(marker))
            with pytest.raises(farpool.WorkerLost, match="exit code 5|code 5"):
                future.result(timeout=20)
            child = int(marker.read_text())
            # The pool replaced the worker and goes on.
            assert ex.submit(pow, 2, 5).result(timeout=20) == 32
        os.kill(child, 0)  # the child is still alive: it was not what told of the death
    finally:
        if child is None and marker.exists():
            child = int(marker.read_text())
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
