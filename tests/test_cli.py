"""The `farpool` command: the demo (the main job) and keygen, run as a user runs them."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time

import pytest

import farpool
from farpool.cli import _is_prime, _probably_prime, _workload


def run_farpool(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "farpool", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_prints_a_timing_table_with_the_same_answers_everywhere():
    done = run_farpool("demo", "--tasks", "4", "--workers", "2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "2 primes among 4 numbers" in out
    for row in ("serial", "stdlib processes (2)", "farpool processes (2)"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert line.rstrip().endswith("x"), line


def test_demo_on_another_backend_by_address():
    done = run_farpool("demo", "--tasks", "2", "--workers", "2", "--address", "threads")
    assert done.returncode == 0, done.stderr
    assert "farpool threads (2)" in done.stdout


def test_demo_refuses_a_bad_count_clearly():
    done = run_farpool("demo", "--tasks", "0")
    assert done.returncode == 2 and "must be at least 1" in done.stderr


def test_workload_is_half_primes_and_the_fast_check_agrees_with_trial_division():
    numbers = _workload(6)
    assert len(numbers) == 6 and [_probably_prime(n) for n in numbers] == [True, False] * 3
    assert all(_probably_prime(n) == _is_prime(n) for n in range(1, 2000))


def test_version_names_what_peers_must_share():
    import cloudpickle
    import zmq

    done = run_farpool("--version", timeout=60)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"farpool {farpool.__version__} (python {sys.version_info[0]}.")
    assert f"cloudpickle {cloudpickle.__version__}" in line and f"libzmq {zmq.zmq_version()}" in line


def test_keygen_writes_a_private_key_file(tmp_path):
    env = {**os.environ, "FARPOOL_KEY_DIR": str(tmp_path / "keys")}
    done = run_farpool("keygen", "--name", "node1", env=env)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "keys" / "issued" / "node1.cluster-key"
    assert str(path) in done.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "client-secret" in path.read_text()
    assert 'role = "client"' in (tmp_path / "keys" / "authorized" / "node1.key").read_text()


def test_keygen_revoke_removes_the_key_and_its_issued_file(tmp_path):
    env = {**os.environ, "FARPOOL_KEY_DIR": str(tmp_path / "keys")}
    assert run_farpool("keygen", "--name", "laptop", env=env).returncode == 0
    assert run_farpool("keygen", "--name", "laptop", env=env).returncode == 0  # laptop-2
    done = run_farpool("keygen", "--revoke", "laptop", env=env)
    assert done.returncode == 0, done.stderr
    assert "revoked laptop" in done.stdout and "within 5 s" in done.stdout
    keys = tmp_path / "keys"
    assert not (keys / "authorized" / "laptop.key").exists()
    assert not (keys / "issued" / "laptop.cluster-key").exists()
    assert (keys / "authorized" / "laptop-2.key").exists()  # only the one named
    again = run_farpool("keygen", "--revoke", "laptop", env=env)
    assert again.returncode == 2 and "no key named 'laptop'" in again.stderr
    assert "laptop-2" in again.stderr  # what there is
    local = run_farpool("keygen", "--revoke", "local", env=env)
    assert local.returncode == 2 and "this host's own key" in local.stderr


def test_keygen_role_and_bad_names_are_clear(tmp_path):
    env = {**os.environ, "FARPOOL_KEY_DIR": str(tmp_path / "keys")}
    done = run_farpool("keygen", "--role", "worker", "--name", "node2", env=env)
    assert done.returncode == 0, done.stderr
    assert 'role = "worker"' in (tmp_path / "keys" / "authorized" / "node2.key").read_text()
    bad = run_farpool("keygen", "--name", "bad name", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr  # was a traceback
    assert "key name 'bad name'" in bad.stderr
    wrong = run_farpool("keygen", "--role", "admin", env=env)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


@pytest.mark.parametrize("address, says", [
    ("tcp://host", "no port (use tcp://HOST:PORT, e.g. tcp://host:5555)"),
    ("host:5555", "use tcp://host:5555"),
    ("tcp://127.0.0.1:99999", "port 99999 is out of range (1-65535)"),
    ("tcp://127.0.0.1:http", "port 'http' is not a number"),
    ("ipc://", "no path"),
])
def test_bad_scheduler_addresses_are_named_at_once(address, says):
    # Before: libzmq's bare "Invalid argument", or a 10 s wait for port 99999.
    from farpool.addresses import check_address

    with pytest.raises(ValueError, match=re.escape(says)):
        check_address(address)
    started = time.monotonic()
    for command in (["status", address, "--timeout", "5"], ["worker", address]):
        done = run_farpool(*command)
        assert done.returncode != 0 and says in done.stderr, done.stderr
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match=re.escape(says)):
        farpool.Executor(address)


def test_bind_addresses_may_name_any_port():
    from farpool.addresses import check_address

    for address in ("tcp://*:0", "tcp://0.0.0.0:*", "tcp://127.0.0.1:5555", "ipc:///tmp/x"):
        assert check_address(address, bind=True) == address
    with pytest.raises(ValueError, match="out of range"):
        check_address("tcp://*:70000", bind=True)
