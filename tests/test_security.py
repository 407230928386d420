"""Keys, permissions, CURVE and the authenticator, on real ZeroMQ sockets on loopback.

Every test runs with $HOME, $XDG_CONFIG_HOME and $FARPOOL_KEY_DIR inside its tmp_path, so
no key is written anywhere else. Sockets close with linger=0; every receive is bounded
by a poll.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from farpool import security
from farpool.errors import SecurityError
from farpool.security import (
    Authenticator,
    KeyPair,
    client_keys,
    configure_client,
    configure_server,
    ensure_keys,
    keygen,
    load_authorized,
    load_key_file,
    write_key_file,
)

pytestmark = pytest.mark.timeout(30)

QUIET_MS = 800  # how long a refused peer gets to (not) deliver a message


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Point every place keys could go at this test's tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FARPOOL_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.delenv("FARPOOL_KEY", raising=False)


@pytest.fixture
def key_dir(tmp_path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def keys(key_dir):
    return ensure_keys(key_dir)


@pytest.fixture
def ctx():
    context = zmq.Context()
    try:
        yield context
    finally:
        context.term()  # hangs (and times out) if a test left a socket open


@pytest.fixture
def make_socket(ctx):
    """Make sockets on ``ctx`` with linger=0, closed at teardown."""
    made: list[zmq.Socket] = []

    def make(kind: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close(linger=0)


@pytest.fixture
def auth(ctx, keys):
    authenticator = Authenticator(ctx, keys.authorized).start()
    try:
        yield authenticator
    finally:
        authenticator.stop()


@pytest.fixture
def server(auth, keys, make_socket):
    """A CURVE ROUTER on 127.0.0.1 checked by ``auth``: ``(socket, endpoint)``."""
    sock = make_socket(zmq.ROUTER)
    configure_server(sock, keys)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def curve_client(make_socket, endpoint: str, pair: KeyPair, server_public: bytes) -> zmq.Socket:
    sock = make_socket(zmq.DEALER)
    configure_client(sock, pair, server_public)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, timeout_ms: int) -> list[bytes] | None:
    """One multipart message, or None if none comes within the timeout."""
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart(zmq.NOBLOCK)
    return None


def assert_round_trip(router: zmq.Socket, dealer: zmq.Socket) -> list[bytes]:
    """Send ping from ``dealer``, answer pong from ``router``; return what the router got."""
    dealer.send(b"ping")
    got = receive(router, 5000)
    assert got is not None and got[1:] == [b"ping"]
    router.send_multipart([got[0], b"pong"])
    assert receive(dealer, 5000) == [b"pong"]
    return got


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- libzmq ------------------------------------------------------------------------------------


def test_require_curve_passes_here():
    security.require_curve()


def test_require_curve_fails_closed_without_curve(monkeypatch):
    monkeypatch.setattr(zmq, "has", lambda feature: False)
    with pytest.raises(SecurityError, match=r"without CURVE") as info:
        security.require_curve()
    assert zmq.zmq_version() in str(info.value)


def test_require_curve_refuses_old_libzmq(monkeypatch):
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 1))
    with pytest.raises(SecurityError, match=r"libzmq 4\.3\.1 is older than 4\.3\.2"):
        security.require_curve()


# -- key directory ------------------------------------------------------------------------------


def test_default_key_dir(tmp_path, monkeypatch):
    assert security.default_key_dir() == tmp_path / "keys"
    monkeypatch.delenv("FARPOOL_KEY_DIR")
    assert security.default_key_dir() == tmp_path / "xdg" / "farpool" / "keys"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert security.default_key_dir() == tmp_path / "home" / ".config" / "farpool" / "keys"


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_keys_created_private_whatever_the_umask(key_dir, umask):
    old = os.umask(umask)
    try:
        keys = ensure_keys()  # from $FARPOOL_KEY_DIR
    finally:
        os.umask(old)
    assert keys.key_dir == key_dir
    for directory in (key_dir, key_dir / "authorized"):
        assert mode(directory) == 0o700
    files = [p for p in key_dir.rglob("*") if p.is_file()]
    assert {p.relative_to(key_dir).as_posix() for p in files} == {
        "server.key_secret", "server.key", "client.key_secret", "client.key", "authorized/local.key",
        ".lock"}
    assert all(mode(p) == 0o600 for p in files)
    assert zmq.curve_public(keys.server.secret) == keys.server.public
    assert zmq.curve_public(keys.client.secret) == keys.client.public
    assert keys.server != keys.client
    assert keys.authorized == [keys.client.public]
    # The secret files are ZPL certificates pyzmq itself can read.
    assert zmq.auth.load_certificate(key_dir / "server.key_secret") == keys.server
    assert ensure_keys(key_dir) == keys  # second use loads, does not recreate


def test_concurrent_first_use_agrees_on_one_set_of_keys(key_dir):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: ensure_keys(key_dir), range(16)))
    assert all(result == results[0] for result in results)
    assert not [p for p in key_dir.rglob("*.tmp")]


@pytest.mark.parametrize(("relative", "bad_mode", "fix"), [
    ("", 0o770, "chmod 700"),
    ("", 0o722, "chmod 700"),
    ("authorized", 0o733, "chmod 700"),
    ("server.key_secret", 0o640, "chmod 600"),
    ("client.key_secret", 0o604, "chmod 600"),
    ("authorized/local.key", 0o666, "chmod 600"),
])
def test_unsafe_modes_are_refused_with_the_fix(keys, key_dir, relative, bad_mode, fix):
    path = key_dir / relative if relative else key_dir
    path.chmod(bad_mode)
    with pytest.raises(SecurityError) as info:
        ensure_keys(key_dir)
    message = str(info.value)
    assert str(path) in message
    assert f"mode {bad_mode:04o}" in message
    assert f"{fix} {path}" in message
    path.chmod(0o700 if path.is_dir() else 0o600)
    assert ensure_keys(key_dir) == keys


def test_secret_readable_by_group_refused_by_load_authorized_too(keys, key_dir):
    (key_dir / "authorized").chmod(0o775)
    with pytest.raises(SecurityError, match="chmod 700"):
        load_authorized(key_dir)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_key_dir_owned_by_someone_else_is_refused(keys, key_dir):
    os.chown(key_dir, 12345, -1)
    with pytest.raises(SecurityError, match=r"owned by uid 12345, not by you"):
        ensure_keys(key_dir)


def test_key_dir_under_a_directory_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(SecurityError, match=rf"{shared}: mode 0777.*chmod go-w"):
        ensure_keys(shared / "keys")
    shared.chmod(0o1777)  # sticky, like /tmp: others cannot rename our directory
    ensure_keys(shared / "keys")


def test_keypair_repr_hides_the_secret(keys):
    assert keys.client.secret.decode() not in repr(keys.client)
    assert keys.client.secret.decode() not in repr(keys)


# -- cluster key files ------------------------------------------------------------------------


def test_key_file_round_trips(tmp_path, keys):
    path = write_key_file(tmp_path / "host.key", keys.server.public, keys.client)
    assert mode(path) == 0o600
    text = path.read_text()
    assert f"server-public = {keys.server.public.decode()}" in text
    assert f"client-public = {keys.client.public.decode()}" in text
    assert f"client-secret = {keys.client.secret.decode()}" in text
    assert load_key_file(path) == (keys.server.public, keys.client)
    with pytest.raises(FileExistsError):
        write_key_file(path, keys.server.public, keys.client)
    other = KeyPair.generate()
    write_key_file(path, keys.server.public, other, overwrite=True)
    assert load_key_file(path) == (keys.server.public, other)


def test_key_file_readable_by_others_is_refused(tmp_path, keys):
    path = write_key_file(tmp_path / "host.key", keys.server.public, keys.client)
    path.chmod(0o644)
    with pytest.raises(SecurityError, match=rf"{path}: mode 0644.*chmod 600 {path}"):
        load_key_file(path)


@pytest.mark.parametrize("damage", ["missing", "mismatched", "garbage", "twice"])
def test_damaged_key_file_is_refused_without_echoing_secrets(keys, damage):
    secret = keys.client.secret.decode()
    lines = {
        "missing": [f"server-public = {keys.server.public.decode()}", f"client-secret = {secret}"],
        "mismatched": [f"server-public = {keys.server.public.decode()}",
                       f"client-public = {keys.server.public.decode()}", f"client-secret = {secret}"],
        "garbage": [f"server-public = {keys.server.public.decode()}",
                    f"client-public = {keys.client.public.decode()}", f"client-secret = {secret[:-2]} ;"],
        "twice": [f"server-public = {keys.server.public.decode()}"] * 2,
    }[damage]
    with pytest.raises(SecurityError) as info:
        security.parse_key_file("\n".join(lines), "test")
    assert secret[:20] not in str(info.value)


def test_farpool_key_as_path_or_inline(tmp_path, keys, monkeypatch):
    remote = KeyPair.generate()
    path = write_key_file(tmp_path / "remote.key", keys.server.public, remote)
    expected = (keys.server.public, remote)

    monkeypatch.setenv("FARPOOL_KEY", str(path))
    assert client_keys() == expected
    monkeypatch.setenv("FARPOOL_KEY", path.read_text())
    assert client_keys() == expected
    compact = ";".join(line.replace(" ", "") for line in path.read_text().splitlines()
                       if not line.startswith("#"))
    monkeypatch.setenv("FARPOOL_KEY", compact)
    assert client_keys() == expected

    # --key-file wins over the environment; the environment wins over the key directory.
    other = write_key_file(tmp_path / "other.key", keys.server.public, keys.client)
    assert client_keys(other) == (keys.server.public, keys.client)
    monkeypatch.delenv("FARPOOL_KEY")
    assert client_keys() == (keys.server.public, keys.client)


def test_client_keys_on_a_host_without_keys_says_what_to_do(tmp_path):
    with pytest.raises(SecurityError, match=r"farpool keygen.*--key-file or \$FARPOOL_KEY"):
        client_keys(key_dir=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    server_public, pair = client_keys(key_dir=tmp_path / "nowhere", create=True)
    assert ensure_keys(tmp_path / "nowhere").client == pair


def test_keygen_authorizes_a_new_key_and_writes_its_key_file(keys, key_dir):
    first = keygen()
    second = keygen(name="gpu-node")
    third = keygen()
    assert first == key_dir / "issued" / "client.cluster-key"
    assert second == key_dir / "issued" / "gpu-node.cluster-key"
    assert third == key_dir / "issued" / "client-2.cluster-key"
    assert mode(key_dir / "issued") == 0o700
    publics = []
    for path in (first, second, third):
        assert mode(path) == 0o600
        server_public, pair = load_key_file(path)
        assert server_public == keys.server.public
        publics.append(pair.public)
    authorized = load_authorized(key_dir)
    assert len(authorized) == 4 and set(authorized) == {keys.client.public, *publics}
    with pytest.raises(ValueError, match="key name"):
        keygen(name="../evil")


def test_authorized_dir_accepts_pyzmq_certificates_and_bare_keys(keys, key_dir, tmp_path):
    public_file, _ = zmq.auth.create_certificates(str(tmp_path), "made-by-pyzmq")
    Path(public_file).replace(key_dir / "authorized" / "pyzmq.key")
    bare = KeyPair.generate().public
    (key_dir / "authorized" / "bare.key").write_bytes(bare + b"\n")
    pyzmq_public, _ = zmq.auth.load_certificate(key_dir / "authorized" / "pyzmq.key")
    assert set(load_authorized(key_dir)) == {keys.client.public, pyzmq_public, bare}


# -- the handshake ---------------------------------------------------------------------------


def test_authorized_client_gets_a_round_trip(server, keys, auth, make_socket):
    router, endpoint = server
    dealer = curve_client(make_socket, endpoint, keys.client, keys.server.public)
    got = assert_round_trip(router, dealer)
    assert auth.accepted == 1 and auth.refused == 0
    # The authenticator names the peer by its public key, for the scheduler to read.
    router.send_multipart([got[0], b"again"])
    dealer.send(b"who")
    frames = router.recv_multipart(copy=False) if router.poll(5000) else None
    assert frames is not None and frames[1].get("User-Id") == keys.client.public.decode()


def test_keygen_key_file_works_from_another_host(keys, key_dir, ctx, make_socket):
    path = keygen(key_dir)
    fresh = ensure_keys(key_dir)  # what a scheduler started now loads
    with Authenticator(ctx, fresh.authorized):
        router = make_socket(zmq.ROUTER)
        configure_server(router, fresh)
        endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        server_public, pair = load_key_file(path)
        assert_round_trip(router, curve_client(make_socket, endpoint, pair, server_public))
        router.close(linger=0)


def test_client_without_keys_delivers_nothing(server, make_socket):
    router, endpoint = server
    plain = make_socket(zmq.DEALER)
    plain.connect(endpoint)
    plain.send(b"cloudpickle payload")
    assert receive(router, QUIET_MS) is None


def test_client_with_an_unauthorized_key_delivers_nothing(server, keys, auth, make_socket):
    router, endpoint = server
    intruder = curve_client(make_socket, endpoint, KeyPair.generate(), keys.server.public)
    intruder.send(b"cloudpickle payload")
    assert receive(router, QUIET_MS) is None
    assert auth.refused >= 1 and auth.accepted == 0


def test_client_sees_why_it_was_refused(server, keys, make_socket):
    router, endpoint = server
    intruder = make_socket(zmq.DEALER)
    configure_client(intruder, KeyPair.generate(), keys.server.public)
    monitor = intruder.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        intruder.connect(endpoint)
        assert monitor.poll(5000)
        event = recv_monitor_message(monitor)
        explained = security.describe_handshake_failure(event["event"], event["value"])
        assert explained is not None and "refused this host's key" in explained
    finally:
        intruder.disable_monitor()
        monitor.close(linger=0)
    assert security.describe_handshake_failure(zmq.EVENT_CONNECTED) is None


def test_allow_list_reloads_for_new_handshakes(server, keys, auth, make_socket):
    router, endpoint = server
    newcomer = KeyPair.generate()
    first = curve_client(make_socket, endpoint, newcomer, keys.server.public)
    first.send(b"early")
    assert receive(router, QUIET_MS) is None

    auth.allow([*keys.authorized, newcomer.public])
    assert_round_trip(router, curve_client(make_socket, endpoint, newcomer, keys.server.public))

    auth.allow([])  # everyone revoked: even the local client is refused now
    late = curve_client(make_socket, endpoint, keys.client, keys.server.public)
    late.send(b"late")
    assert receive(router, QUIET_MS) is None


def zmtp1_message(body: bytes) -> bytes:
    """A ZMTP/1.0 peer: an empty identity frame, then one message, with no handshake."""
    return b"\x01\x00" + bytes([len(body) + 1, 0]) + body


def zmtp3_null_message(body: bytes) -> bytes:
    """A ZMTP/3.0 NULL-mechanism greeting, READY and one message, sent blind."""
    greeting = b"\xff" + bytes(7) + b"\x01\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
    ready = b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    return greeting + b"\x04" + bytes([len(ready)]) + ready + b"\x00" + bytes([len(body)]) + body


RAW_PAYLOADS = {
    "zmtp1": zmtp1_message(b"cloudpickle payload"),
    "zmtp3-null": zmtp3_null_message(b"cloudpickle payload"),
    "garbage": bytes(range(256)) * 4,
    "http": b"GET / HTTP/1.1\r\nHost: farpool\r\n\r\n",
}


def send_raw(endpoint: str, data: bytes) -> socket.socket:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=5)
    conn.sendall(data)
    return conn


def test_raw_zmtp1_bytes_do_reach_a_plain_socket(make_socket):
    """The control for the test below: what it sends is a real attack on a plain socket."""
    router = make_socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    with send_raw(endpoint, RAW_PAYLOADS["zmtp1"]):
        got = receive(router, 5000)
    assert got is not None and got[-1] == b"cloudpickle payload"


@pytest.mark.parametrize("kind", sorted(RAW_PAYLOADS))
def test_raw_bytes_deliver_nothing(server, kind):
    router, endpoint = server
    with send_raw(endpoint, RAW_PAYLOADS[kind]):
        assert receive(router, QUIET_MS) is None


@pytest.mark.parametrize("mechanism", ["NULL", "PLAIN"])
def test_authenticator_refuses_null_and_plain(auth, make_socket, mechanism):
    router = make_socket(zmq.ROUTER)
    router.zap_domain = security.ZAP_DOMAIN  # so libzmq asks the authenticator at all
    dealer = make_socket(zmq.DEALER)
    if mechanism == "PLAIN":
        router.plain_server = True
        dealer.plain_username = b"admin"
        dealer.plain_password = b"admin"
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    dealer.connect(endpoint)
    dealer.send(b"payload")
    # The refusal comes when the handshake reaches the authenticator, which a loaded
    # machine may delay past QUIET_MS: wait for it (bounded), then for nothing to arrive.
    deadline = time.monotonic() + 20
    while auth.refused == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert auth.refused >= 1 and auth.accepted == 0
    assert receive(router, QUIET_MS) is None


def test_zap_verdict_core():
    key = KeyPair.generate().public
    request = [b"1.0", b"7", b"farpool", b"10.0.0.9", b"", b"CURVE", zmq.utils.z85.decode(key)]
    admitted = security.zap_verdict(request, {key})
    assert admitted.allowed and (admitted.status, admitted.user_id) == (b"200", key)
    assert "10.0.0.9" in admitted.detail
    refusals = {
        "not authorized": security.zap_verdict(request, set()),
        "domain": security.zap_verdict([*request[:2], b"other", *request[3:]], {key}),
        "version": security.zap_verdict([b"2.0", *request[1:]], {key}),
        "CURVE only": security.zap_verdict([*request[:5], b"NULL"], {key}),
        "malformed CURVE": security.zap_verdict([*request[:6], b"short"], {key}),
        "malformed ZAP": security.zap_verdict(request[:3], {key}),
    }
    for expected, verdict in refusals.items():
        assert verdict.status == b"400" and not verdict.allowed and verdict.user_id == b""
        assert expected in verdict.detail


# -- sockets and the authenticator's life ------------------------------------------------------


def test_configure_server_needs_a_running_authenticator_and_an_unbound_socket(ctx, keys, make_socket):
    sock = make_socket(zmq.ROUTER)
    with pytest.raises(SecurityError, match="no farpool Authenticator"):
        configure_server(sock, keys)
    with Authenticator(ctx, keys.authorized):
        sock.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(SecurityError, match="before the socket binds"):
            configure_server(sock, keys)
        dealer = make_socket(zmq.DEALER)
        dealer.connect("tcp://127.0.0.1:9")
        with pytest.raises(SecurityError, match="before the socket binds or connects"):
            configure_client(dealer, keys.client, keys.server.public)
    with pytest.raises(SecurityError, match="secret key"):
        configure_client(make_socket(zmq.DEALER), KeyPair(keys.client.public), keys.server.public)


def test_stopped_authenticator_fails_closed(ctx, keys, make_socket):
    """With no ZAP handler left, a new handshake is refused, not waved through."""
    auth = Authenticator(ctx, keys.authorized).start()
    router = make_socket(zmq.ROUTER)
    configure_server(router, keys)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    auth.stop()
    curve_client(make_socket, endpoint, keys.client, keys.server.public).send(b"payload")
    assert receive(router, QUIET_MS) is None


def test_authenticator_lifecycle_leaves_no_thread(ctx, keys):
    def zap_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "farpool-zap"]

    auth = Authenticator(ctx, keys.authorized)
    auth.stop()  # never started: a no-op
    with auth:
        assert auth.is_alive() and len(zap_threads()) == 1
        with pytest.raises(SecurityError, match="already runs on this context"):
            Authenticator(ctx).start()
        with pytest.raises(RuntimeError, match="already started"):
            auth.start()
    assert not auth.is_alive() and zap_threads() == []
    auth.stop()  # twice: still fine
    with Authenticator(ctx, keys.authorized) as again:  # the context is free again
        assert again.is_alive()
    assert zap_threads() == []
    with pytest.raises(SecurityError):
        Authenticator(ctx, [b"not a key"])


def test_authenticator_ends_when_its_context_is_terminated(keys):
    context = zmq.Context()
    auth = Authenticator(context, keys.authorized).start()
    done = threading.Event()
    terminator = threading.Thread(target=lambda: (context.term(), done.set()))
    terminator.start()
    assert done.wait(5), "context.term() hung on the authenticator's sockets"
    terminator.join(5)
    auth.stop()
    assert not auth.is_alive()


def test_insecure_warning(capsys):
    text = security.warn_insecure("tcp://0.0.0.0:5555")
    assert "tcp://0.0.0.0:5555" in text and "--insecure" in text and "runs code" in text
    assert capsys.readouterr().err == text
    assert security.requires_keys("tcp://127.0.0.1:5555")
    assert not security.requires_keys("ipc:///run/farpool/pool")
    assert not security.requires_keys("inproc://pool")


def test_key_material_stays_in_tmp_path(tmp_path):
    keygen()
    client_keys()
    assert security.default_key_dir() == tmp_path / "keys"
    assert not (tmp_path / "home").exists() and not (tmp_path / "xdg").exists()
