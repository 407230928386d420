"""Keys, CURVE and the ZAP authenticator: what makes a TCP endpoint safe to unpickle from.

Unpickling runs code, and a plain ZeroMQ TCP socket takes bytes from anyone who can
reach it (libzmq even accepts raw ZMTP/1.0 frames with no handshake, and on loopback
every local user can reach it). So every network-facing farpool socket uses CURVE
(libsodium, through libzmq) *and* an allow-list of client public keys, checked by an
:class:`Authenticator` answering ZAP requests: knowing the server's public key is not
enough. A refused peer is dropped in the handshake, before libzmq hands farpool a
single frame from it::

    scheduler host                                remote host (worker or client)
    $FARPOOL_KEY_DIR or ~/.config/farpool/keys    --key-file PATH, or $FARPOOL_KEY
      server.key_secret  the scheduler's pair       server-public = ...
      client.key_secret  this host's client pair    client-public = ...
      authorized/*.key   allowed client keys        client-secret = ...
      issued/NAME.cluster-key ──── copied ───────▶  (written by keygen())

    ROUTER  configure_server(sock, keys)    ◀─CURVE─  DEALER  configure_client(sock, ...)
      │ ZAP request: mechanism, client public key
      ▼
    Authenticator thread on inproc://zeromq.zap.01: CURVE and an allowed key -> 200,
    anything else (NULL, PLAIN, unknown key, other domain) -> 400, counted and logged

Key directory (created on first use by :func:`ensure_keys`; directories 0700, files
0600, each file written under a temporary name opened with O_EXCL and mode 0600, then
hard-linked into place, so it is never readable by others nor seen half-written; an
flock on ``.lock`` makes processes starting at once agree on one set of keys)::

    server.key_secret / server.key    the scheduler's pair / its public half
    client.key_secret / client.key    the pair clients and workers on this host use
    authorized/local.key              this host's client public key (added at creation)
    authorized/NAME.key               keys added by keygen() (or by hand): each allowed
    issued/NAME.cluster-key           cluster key files made by keygen(), to copy away
    .lock                             empty; locked while keys are created or loaded

``*.key`` and ``*.key_secret`` files use the ZPL certificate format of czmq and pyzmq
(``zmq.auth.create_certificates`` output can be dropped into ``authorized/``); a file
holding one bare Z85 public key is accepted there too. Loading checks permissions the
way ssh does and refuses, naming the path, its mode and the fix: a key directory (or any
directory above it) that others may write, anything not owned by you (or root), a
secret-key file that others may read.

Cluster key file (``--key-file PATH``; ``$FARPOOL_KEY``): plain text, ``name = value``
lines, ``#`` comment lines, values Z85 (which never contains ``;``, spaces or quotes)::

    server-public = <40 characters>
    client-public = <40 characters>
    client-secret = <40 characters>

``$FARPOOL_KEY`` holds either the path of such a file or, when its value contains
``server-public``, the file's contents inline; inline, the three fields may also be
separated by ``;`` (``server-public=...;client-public=...;client-secret=...``), which
fits in an environment variable set from a container secret.

Rules for callers (scheduler, worker, client): call :func:`require_curve` before
opening a network socket; start an :class:`Authenticator` on the context *before*
:func:`configure_server`; configure sockets before ``bind``/``connect``; close server
sockets before stopping the authenticator. ``ipc://`` and ``inproc://`` endpoints rely
on file-system permissions instead (:func:`requires_keys`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shlex
import stat
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, TextIO

import zmq
from zmq.utils import z85

try:
    import fcntl
except ImportError:  # Windows: no flock; first use there is not guarded against races
    fcntl = None  # type: ignore[assignment]

from farpool.errors import SecurityError

__all__ = [
    "MIN_LIBZMQ",
    "ZAP_DOMAIN",
    "Authenticator",
    "ClusterKeys",
    "KeyPair",
    "ZapVerdict",
    "client_keys",
    "configure_client",
    "configure_server",
    "default_key_dir",
    "describe_handshake_failure",
    "ensure_keys",
    "format_key_file",
    "insecure_warning",
    "keygen",
    "load_authorized",
    "load_key_file",
    "parse_key_file",
    "require_curve",
    "requires_keys",
    "warn_insecure",
    "write_key_file",
    "zap_verdict",
]

log = logging.getLogger(__name__)

#: libzmq 4.3.2 fixes CVE-2019-13132, a stack overflow any unauthenticated peer could
#: trigger in the CURVE handshake: older versions make CURVE an attack surface.
MIN_LIBZMQ = (4, 3, 2)
#: The ZAP domain farpool's server sockets use; the authenticator refuses any other.
ZAP_DOMAIN = b"farpool"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
KEY_DIR_ENV = "FARPOOL_KEY_DIR"
KEY_ENV = "FARPOOL_KEY"

_ZAP_VERSION = b"1.0"
_STOP = b"STOP"
_POSIX = hasattr(os, "geteuid")  # ownership and mode bits mean nothing on Windows
_MAX_KEY_FILE = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLUSTER_FIELDS = ("server-public", "client-public", "client-secret")


def require_curve() -> None:
    """Fail closed unless libzmq has CURVE and is at least 4.3.2.

    Raises :class:`~farpool.errors.SecurityError` naming the libzmq version found.
    """
    found = tuple(zmq.zmq_version_info())
    version = ".".join(str(part) for part in found)
    if not zmq.has("curve"):
        raise SecurityError(
            f"libzmq {version} was built without CURVE (libsodium), so farpool cannot "
            "encrypt or authenticate network sockets and refuses to open them; install a "
            "pyzmq wheel (its bundled libzmq has CURVE) or a libzmq built with libsodium")
    if found < MIN_LIBZMQ:
        raise SecurityError(
            f"libzmq {version} is older than 4.3.2: its CURVE handshake can be crashed or "
            "hijacked by an unauthenticated peer (CVE-2019-13132); upgrade pyzmq/libzmq")


# -- keys --------------------------------------------------------------------------------


class KeyPair(NamedTuple):
    """A CURVE key pair, Z85-encoded (40 bytes each) as from ``zmq.curve_keypair()``.

    ``secret`` is None for a public key alone. The repr never shows the secret.
    """

    public: bytes
    secret: bytes | None = None

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random pair (libsodium through libzmq)."""
        require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def __repr__(self) -> str:
        # Key pairs end up in tracebacks and logs; the secret must not.
        secret = "None" if self.secret is None else "<hidden>"
        return f"KeyPair(public={self.public!r}, secret={secret})"


class ClusterKeys(NamedTuple):
    """The keys of one key directory, as :func:`ensure_keys` returns them."""

    server: KeyPair
    """The scheduler's pair."""
    client: KeyPair
    """The pair clients and workers on this host connect with."""
    authorized: list[bytes]
    """Allowed client public keys (Z85), from ``authorized/*.key``."""
    key_dir: Path
    """The directory they were loaded from."""


def default_key_dir() -> Path:
    """``$FARPOOL_KEY_DIR`` if set, else ``$XDG_CONFIG_HOME/farpool/keys`` (by default
    ``~/.config/farpool/keys``)."""
    configured = os.environ.get(KEY_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / "farpool" / "keys"


def ensure_keys(key_dir: str | os.PathLike[str] | None = None) -> ClusterKeys:
    """Load the keys in ``key_dir`` (default :func:`default_key_dir`), creating what is
    missing on first use; the local client key is authorized when it is created.

    Raises :class:`~farpool.errors.SecurityError` if the directory or a file in it has
    unsafe ownership or permissions (see the module docstring).
    """
    directory = Path(key_dir if key_dir is not None else default_key_dir()).expanduser().absolute()
    _make_private_dir(directory)
    _check_key_dir(directory)
    # Several processes may start at once on a fresh directory (`farpool cluster`); the
    # lock makes them agree on one set of keys and never load a half-made set.
    with _locked(directory):
        authorized = directory / "authorized"
        _make_private_dir(authorized)
        server, _ = _ensure_pair(directory, "server")
        client, created = _ensure_pair(directory, "client")
        if created:
            # Replace, not add: a new local client key (after the old one was deleted)
            # also takes the old one's place in the allow-list.
            _write_private(authorized / "local.key", _cert_text(KeyPair(client.public), "client"),
                           replace=True)
        return ClusterKeys(server, client, load_authorized(directory), directory)


def load_authorized(key_dir: str | os.PathLike[str] | None = None) -> list[bytes]:
    """The allowed client public keys of ``key_dir``: one per ``authorized/*.key`` file.

    Call it again (and pass the result to :meth:`Authenticator.allow`) to pick up keys
    added or removed since; the order is by file name, duplicates dropped.
    """
    directory = Path(key_dir if key_dir is not None else default_key_dir()).expanduser().absolute()
    _check_key_dir(directory)
    authorized = directory / "authorized"
    _check_dir(authorized)
    keys: list[bytes] = []
    for path in sorted(authorized.glob("*.key")):
        text = _read_checked(path, secret=False)
        fields = _fields(text, str(path), ("public-key",))
        if "public-key" in fields:
            key = _z85_key(fields["public-key"], "public-key", str(path))
        else:  # a file holding one bare key
            key = _z85_key(text.strip(), "public key", str(path))
        if key not in keys:
            keys.append(key)
    return keys


def keygen(key_dir: str | os.PathLike[str] | None = None, *, name: str = "client") -> Path:
    """Make a new client pair, authorize it, and write a cluster key file for a remote host.

    The public key goes to ``authorized/NAME.key`` (``NAME-2``, ``NAME-3``... if taken)
    and the cluster key file to ``issued/NAME.cluster-key``, whose path is returned:
    copy it to the remote host (keeping it private) and pass it as ``--key-file`` or
    ``$FARPOOL_KEY``. A running scheduler sees the new key once it reloads its allow-list
    (:func:`load_authorized`). Revoke by deleting ``authorized/NAME.key``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    keys = ensure_keys(key_dir)
    issued = keys.key_dir / "issued"
    _make_private_dir(issued)
    pair = KeyPair.generate()
    public_text = _cert_text(KeyPair(pair.public), name)
    number = 1
    while True:
        taken = name if number == 1 else f"{name}-{number}"
        # Claiming the name by creating its file (link refuses an existing name) keeps
        # two keygen runs at once from sharing a name.
        if _write_private(keys.key_dir / "authorized" / f"{taken}.key", public_text):
            break
        number += 1
    # A leftover file of that name belonged to a key revoked since: replace it.
    return write_key_file(issued / f"{taken}.cluster-key", keys.server.public, pair, overwrite=True)


# -- cluster key files ---------------------------------------------------------------------


def format_key_file(server_public: bytes, client: KeyPair) -> str:
    """The text of a cluster key file (see the module docstring)."""
    server_public = _z85_key(server_public, "server-public", "format_key_file")
    if client.secret is None:
        raise SecurityError("a cluster key file needs the client's secret key")
    _check_pair(client, "format_key_file")
    return (
        "# farpool cluster key file: lets this host's workers and clients reach a farpool\n"
        "# scheduler. It holds a client SECRET key: keep it mode 0600 and share it with no one.\n"
        f"server-public = {server_public.decode()}\n"
        f"client-public = {client.public.decode()}\n"
        f"client-secret = {client.secret.decode()}\n"
    )


def parse_key_file(text: str, source: str = "$" + KEY_ENV) -> tuple[bytes, KeyPair]:
    """Read a cluster key file's text: ``(server_public, client_pair)``.

    ``source`` names the text's origin in error messages.
    """
    fields = _fields(text, source, _CLUSTER_FIELDS)
    missing = [name for name in _CLUSTER_FIELDS if name not in fields]
    if missing:
        raise SecurityError(f"{source}: not a farpool cluster key file (missing {', '.join(missing)})")
    server = _z85_key(fields["server-public"], "server-public", source)
    client = KeyPair(_z85_key(fields["client-public"], "client-public", source),
                     _z85_key(fields["client-secret"], "client-secret", source))
    _check_pair(client, source)
    return server, client


def write_key_file(path: str | os.PathLike[str], server_public: bytes, client_pair: KeyPair, *,
                   overwrite: bool = False) -> Path:
    """Write a cluster key file at ``path``, mode 0600, atomically; return its path.

    Raises FileExistsError if ``path`` exists, unless ``overwrite``.
    """
    path = Path(path).expanduser()
    if not _write_private(path, format_key_file(server_public, client_pair), replace=overwrite):
        raise FileExistsError(errno.EEXIST, "key file exists (pass overwrite=True to replace it)", str(path))
    return path


def load_key_file(path: str | os.PathLike[str]) -> tuple[bytes, KeyPair]:
    """Read the cluster key file at ``path``: ``(server_public, client_pair)``.

    Refuses a file that is not yours or that others may read, as ssh does.
    """
    path = Path(path).expanduser()
    return parse_key_file(_read_checked(path, secret=True), str(path))


def client_keys(key_file: str | os.PathLike[str] | None = None, *,
                key_dir: str | os.PathLike[str] | None = None,
                create: bool = False) -> tuple[bytes, KeyPair]:
    """The keys a client or worker connects with: ``(server_public, client_pair)``.

    Taken from, in order: ``key_file`` (``--key-file``); ``$FARPOOL_KEY`` (a path, or
    the file's contents inline); this host's key directory. The directory is only
    created when ``create`` is true: a client on a host without keys gets an error that
    says what to do, rather than fresh keys no scheduler knows.
    """
    if key_file is not None:
        return load_key_file(key_file)
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        if "server-public" in env:
            return parse_key_file(env, "$" + KEY_ENV)
        return load_key_file(env)
    directory = Path(key_dir if key_dir is not None else default_key_dir()).expanduser()
    if not create and not (directory / "server.key_secret").exists():
        raise SecurityError(
            f"no farpool keys: {directory} has none. On the scheduler's host they are "
            "created when the scheduler first starts; elsewhere run `farpool keygen` on the "
            f"scheduler's host and pass the file it writes with --key-file or ${KEY_ENV}")
    keys = ensure_keys(directory)
    return keys.server.public, keys.client


# -- sockets ---------------------------------------------------------------------------------


def configure_server(sock: zmq.Socket, keys: ClusterKeys) -> None:
    """Make ``sock`` a CURVE server with the scheduler's keys whose peers are checked by
    the :class:`Authenticator` running on its context. Call before ``bind``."""
    require_curve()
    _check_unused(sock, "configure_server")
    if _authenticator_for(sock.context) is None:
        # Without a ZAP handler libzmq admits any client that knows the server key.
        raise SecurityError("no farpool Authenticator is running on this socket's context: "
                            "start one (Authenticator(ctx, keys.authorized).start()) first")
    if keys.server.secret is None:
        raise SecurityError("configure_server needs the scheduler's secret key")
    sock.curve_secretkey = keys.server.secret
    sock.curve_publickey = keys.server.public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN
    # With ZAP_ENFORCE_DOMAIN, a handshake finding no ZAP handler (authenticator stopped)
    # fails instead of being admitted. It is a draft option some libzmq builds lack;
    # there the running-authenticator check above is the guard.
    with contextlib.suppress(zmq.ZMQError, AttributeError):
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def configure_client(sock: zmq.Socket, client: KeyPair, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client with ``client``'s keys that only talks to the server
    holding ``server_public``'s secret. Call before ``connect``."""
    require_curve()
    _check_unused(sock, "configure_client")
    if client.secret is None:
        raise SecurityError("configure_client needs the client's secret key")
    sock.curve_secretkey = client.secret
    sock.curve_publickey = client.public
    sock.curve_serverkey = _z85_key(server_public, "server public key", "configure_client")


def requires_keys(address: str) -> bool:
    """Whether binding ``address`` needs CURVE keys (or ``--insecure``): every transport
    but ``ipc://`` and ``inproc://``, which file-system permissions and the process guard."""
    return not address.startswith(("ipc://", "inproc://"))


def insecure_warning(address: str) -> str:
    """The warning for serving ``address`` without keys (``--insecure``)."""
    return (
        f"WARNING: --insecure: farpool serves {address} WITHOUT encryption or authentication.\n"
        "Anyone who can reach that address (on loopback, every user and program on this host)\n"
        "can send it pickles, and unpickling runs code: they can run any program on the\n"
        "workers, as the user running them, and read every task's data. Use --insecure only\n"
        "where you trust every host and user that can connect. Without it, farpool uses CURVE\n"
        f"keys from {default_key_dir()} (see `farpool keygen`).\n"
    )


def warn_insecure(address: str, file: TextIO | None = None) -> str:
    """Print :func:`insecure_warning` to ``file`` (default stderr) and log it; return it."""
    text = insecure_warning(address)
    print(text, end="", file=file if file is not None else sys.stderr, flush=True)
    log.warning("serving %s without CURVE keys (--insecure)", address)
    return text


def describe_handshake_failure(event: int, value: int = 0) -> str | None:
    """Explain a client socket's monitor event if it is a failed security handshake.

    For a client or worker to turn a refusal into a clear error instead of waiting for
    a reply that never comes; None for any other event.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the scheduler refused this host's key (ZAP status {value}): it is not in the "
                "scheduler's authorized keys; on the scheduler's host, `farpool keygen` makes "
                "a key file to use here")
    if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
        return ("the security handshake with the scheduler failed: the server public key is "
                "probably wrong (a key file from another scheduler?), or the scheduler runs "
                "without keys (--insecure)")
    return None


# -- the authenticator -------------------------------------------------------------------------


class ZapVerdict(NamedTuple):
    """The answer to one ZAP request (RFC 27): status code and text, the user id given
    to admitted peers (their Z85 public key, readable as a frame's ``User-Id``), and a
    description for the log."""

    status: bytes
    text: bytes
    user_id: bytes
    detail: str

    @property
    def allowed(self) -> bool:
        """Whether the peer is admitted."""
        return self.status == b"200"


def zap_verdict(frames: list[bytes], allowed: frozenset[bytes] | set[bytes],
                domain: bytes = ZAP_DOMAIN) -> ZapVerdict:
    """Decide one ZAP request (its frames after the REP envelope); no I/O.

    Admits only CURVE peers in ``domain`` whose Z85 public key is in ``allowed``.
    """
    if len(frames) < 6:
        return _refusal(f"malformed ZAP request ({len(frames)} frames)")
    version, _request_id, req_domain, address, _routing_id, mechanism, *credentials = frames
    peer = address.decode("ascii", "replace") or "an unknown address"
    if version != _ZAP_VERSION:
        return _refusal(f"from {peer}: ZAP version {version[:8]!r} is not 1.0")
    if req_domain != domain:
        return _refusal(f"from {peer}: ZAP domain {req_domain[:64]!r} is not {domain!r}")
    if mechanism != b"CURVE":
        return _refusal(f"from {peer}: mechanism {mechanism[:20].decode('ascii', 'replace')} "
                        "is refused (CURVE only)")
    if len(credentials) != 1 or len(credentials[0]) != 32:
        return _refusal(f"from {peer}: malformed CURVE credentials")
    key = z85.encode(credentials[0])
    if key not in allowed:
        return _refusal(f"from {peer}: CURVE key {key.decode()} is not authorized")
    return ZapVerdict(b"200", b"OK", key, f"from {peer}: CURVE key {key.decode()} admitted")


def _refusal(detail: str) -> ZapVerdict:
    return ZapVerdict(b"400", b"Not authorized", b"", detail)


# One authenticator per context: libzmq sends all of a context's ZAP requests to the one
# socket bound on ZAP_ENDPOINT in it.
_running: weakref.WeakKeyDictionary[zmq.Context, Authenticator] = weakref.WeakKeyDictionary()
_running_lock = threading.Lock()


def _authenticator_for(context: zmq.Context) -> Authenticator | None:
    with _running_lock:
        auth = _running.get(context)
    return auth if auth is not None and auth.is_alive() else None


class Authenticator:
    """Answers the ZAP requests of one ``zmq.Context``: admits only CURVE peers whose
    public key is allowed, refusing everything else (NULL and PLAIN included).

    A thread named ``farpool-zap`` owns the ZAP socket and a control pipe; ``stop()``
    (or terminating the context) ends it, and ``stop()`` returns once it has exited.
    ``allow()`` swaps the allow-list at any time; ``accepted`` and ``refused`` count
    answers, and refusals are logged (at most one line a second, with a count of the
    rest). Use as a context manager, or ``start()``/``stop()``::

        with Authenticator(ctx, keys.authorized):
            ...  # configure_server(sock, keys); sock.bind(...)
    """

    def __init__(self, context: zmq.Context, allowed: Iterable[bytes] = (), *,
                 domain: bytes = ZAP_DOMAIN) -> None:
        self.context = context
        self.domain = domain
        self.accepted = 0
        self.refused = 0
        self._allowed: frozenset[bytes] = frozenset()
        self.allow(allowed)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: zmq.ZMQError | None = None
        self._control = f"inproc://farpool-zap-control-{secrets.token_hex(8)}"
        self._last_logged = float("-inf")
        self._unlogged = 0

    @property
    def allowed(self) -> frozenset[bytes]:
        """The Z85 public keys admitted now."""
        return self._allowed

    def allow(self, keys: Iterable[bytes]) -> None:
        """Replace the allow-list (Z85 public keys); applies to the next handshakes."""
        # One attribute swap: the thread reads either the old or the new set, never a mix.
        self._allowed = frozenset(_z85_key(key, "allowed key", "Authenticator.allow") for key in keys)

    def start(self, timeout: float = 5.0) -> Authenticator:
        """Start the thread and wait (at most ``timeout`` s) until it answers ZAP."""
        require_curve()
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this Authenticator is already started")
            with _running_lock:
                other = _running.get(self.context)
                if other is not None and other.is_alive():
                    raise SecurityError("another Authenticator already runs on this context")
                _running[self.context] = self
            self._started.clear()
            self._start_error = None
            self._thread = threading.Thread(target=self._run, name="farpool-zap", daemon=True)
            self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise SecurityError(f"the authenticator thread did not start within {timeout} s")
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            raise SecurityError(f"cannot answer ZAP on this context: {error}") from error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it to exit; a no-op if not running."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            try:
                if thread.is_alive():
                    self._signal_stop(thread, timeout)
                thread.join(timeout)
            finally:
                with _running_lock:
                    if _running.get(self.context) is self:
                        del _running[self.context]
            if thread.is_alive():
                raise SecurityError(f"the authenticator thread did not stop within {timeout} s")

    def is_alive(self) -> bool:
        """Whether the thread is running."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def __enter__(self) -> Authenticator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _signal_stop(self, thread: threading.Thread, timeout: float) -> None:
        try:
            pipe = self.context.socket(zmq.PAIR)
        except zmq.ZMQError:
            return  # context terminated: the thread has seen ETERM and is leaving
        try:
            pipe.linger = 0
            pipe.connect(self._control)
            if pipe.poll(int(timeout * 1000), zmq.POLLOUT):
                pipe.send(_STOP)
                # Keep the pipe open until the thread has read the message: closing it
                # with linger 0 could discard it unread.
                thread.join(timeout)
        finally:
            pipe.close(linger=0)

    def _run(self) -> None:
        zap = control = None
        try:
            control = self.context.socket(zmq.PAIR)
            control.linger = 0
            control.bind(self._control)
            zap = self.context.socket(zmq.REP)
            zap.linger = 0
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as error:
            self._start_error = error
            for sock in (zap, control):
                if sock is not None:
                    sock.close(linger=0)
            self._started.set()
            return
        self._started.set()
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready and control.recv() == _STOP:
                    return
                if zap in ready:
                    self._answer(zap)
        except zmq.ContextTerminated:
            pass  # the context is going away: release our sockets so term() can finish
        finally:
            zap.close(linger=0)
            control.close(linger=0)

    def _answer(self, zap: zmq.Socket) -> None:
        frames = zap.recv_multipart()
        try:
            verdict = zap_verdict(frames, self._allowed, self.domain)
        except Exception:  # a bug must not leave the handshake waiting for a reply
            log.exception("ZAP request could not be decided; refusing it")
            verdict = _refusal("internal error")
        request_id = frames[1] if len(frames) > 1 else b""
        zap.send_multipart([_ZAP_VERSION, request_id, verdict.status, verdict.text, verdict.user_id, b""])
        if verdict.allowed:
            self.accepted += 1
            log.debug("ZAP %s", verdict.detail)
            return
        self.refused += 1
        # Throttled: a peer hammering the port must not flood the log.
        now = time.monotonic()
        if now - self._last_logged < 1.0:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last report)" if self._unlogged else ""
        log.warning("refused a connection %s%s", verdict.detail, more)
        self._last_logged, self._unlogged = now, 0


# -- files and permissions ---------------------------------------------------------------------


def _z85_key(value: str | bytes, what: str, source: str) -> bytes:
    """``value`` as a Z85 key (40 bytes), or SecurityError; never echoes the value."""
    raw = value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)
    try:
        valid = len(raw) == 40 and len(z85.decode(raw)) == 32
    except (KeyError, ValueError, TypeError):  # z85.decode on characters outside Z85
        valid = False
    if not valid:
        raise SecurityError(f"{source}: {what} is not a Z85-encoded CURVE key (40 characters)")
    return raw


def _check_pair(pair: KeyPair, source: str) -> None:
    if pair.secret is not None and zmq.curve_public(pair.secret) != pair.public:
        raise SecurityError(f"{source}: the public key does not belong to the secret key "
                            "(file damaged or edited?)")


def _fields(text: str, source: str, wanted: Iterable[str]) -> dict[str, str]:
    """``name = value`` pairs of a key file (ZPL certificate or cluster key file).

    Lines without ``=`` (comments, ZPL section names) are skipped; ``;`` also ends a
    line; values lose surrounding quotes. Only the ``wanted`` names are kept.
    """
    wanted = set(wanted)
    found: dict[str, str] = {}
    for line in text.replace(";", "\n").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name = name.strip().lower()
        if name not in wanted:
            continue
        if name in found:
            raise SecurityError(f"{source}: {name} is given twice")
        found[name] = value.strip().strip("'\"")
    return found


def _cert_text(pair: KeyPair, role: str) -> str:
    kind = "public" if pair.secret is None else "SECRET"
    lines = [f"#   farpool CURVE {kind} certificate ({role}), ZPL format as czmq and pyzmq write it",
             "#   Keep this file to yourself (mode 0600)." if pair.secret else "#",
             "", "metadata", "curve", f'    public-key = "{pair.public.decode()}"']
    if pair.secret is not None:
        lines.append(f'    secret-key = "{pair.secret.decode()}"')
    return "\n".join(lines) + "\n"


def _ensure_pair(directory: Path, name: str) -> tuple[KeyPair, bool]:
    """Load ``name.key_secret``, creating it first if missing; also say if we created it."""
    path = directory / f"{name}.key_secret"
    created = False
    if not path.exists():
        pair = KeyPair.generate()
        # If another process won the race, its keys are loaded below and ours dropped.
        created = _write_private(path, _cert_text(pair, name))
        if created:
            _write_private(directory / f"{name}.key", _cert_text(KeyPair(pair.public), name),
                           replace=True)
    fields = _fields(_read_checked(path, secret=True), str(path), ("public-key", "secret-key"))
    if len(fields) != 2:
        raise SecurityError(f"{path}: not a CURVE secret certificate (public-key and secret-key)")
    pair = KeyPair(_z85_key(fields["public-key"], "public-key", str(path)),
                   _z85_key(fields["secret-key"], "secret-key", str(path)))
    _check_pair(pair, str(path))
    return pair, created


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/.lock`` (where fcntl exists)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(directory / ".lock", flags, 0o600)
    try:
        if _POSIX:
            with contextlib.suppress(OSError):  # a restrictive umask may have left it 0400
                os.fchmod(fd, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _make_private_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)  # never wider than 0700, whatever the umask
    except FileExistsError:
        pass
    else:
        if _POSIX:
            os.chmod(path, 0o700)  # the umask may have taken the owner's own bits
    _check_dir(path)


def _write_private(path: Path, text: str, *, replace: bool = False) -> bool:
    """Write ``text`` to ``path`` with mode 0600, never visible half-written or with
    wider modes. Returns False, writing nothing, if ``path`` exists and not ``replace``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if _POSIX:
                os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(temporary, path)
            return True
        try:
            # link() is atomic and refuses an existing name, so two processes creating
            # keys at once never overwrite each other's.
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _read_checked(path: Path, *, secret: bool) -> str:
    """Read a key file, checking owner and mode on the open file (not a second lookup
    by name, which could find another file)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SecurityError(f"{path}: no such key file")
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecurityError(f"{path} is not a regular file")
        _check_owner(path, info)
        if _POSIX and secret and info.st_mode & 0o077:
            raise _unsafe(path, info, 0o600, "lets others use a secret key")
        if _POSIX and not secret and info.st_mode & 0o022:
            raise _unsafe(path, info, 0o600, "lets others change an authorized key")
        return f.read(_MAX_KEY_FILE)


def _check_dir(path: Path) -> None:
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise SecurityError(f"{path} is not a directory")
    _check_owner(path, info)
    if _POSIX and info.st_mode & 0o022:
        raise _unsafe(path, info, 0o700, "lets others add or replace keys in it")


def _check_key_dir(path: Path) -> None:
    """The key directory and every directory above it, as sshd checks ~/.ssh."""
    _check_dir(path)
    if not _POSIX:
        return
    for parent in path.resolve().parents:
        info = os.stat(parent)
        # A sticky directory (/tmp) lets others create entries but not rename ours.
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise SecurityError(
                f"unsafe permissions on {parent}: mode {stat.S_IMODE(info.st_mode):04o} lets others "
                f"replace the key directory {path} below it; farpool refuses it, as ssh does. Fix: "
                f"chmod go-w {shlex.quote(str(parent))}, or set {KEY_DIR_ENV} to a private directory")


def _check_owner(path: Path, info: os.stat_result) -> None:
    if not _POSIX:
        return
    uid = os.geteuid()
    if info.st_uid not in (uid, 0):
        raise SecurityError(
            f"{path} is owned by uid {info.st_uid}, not by you (uid {uid}) or root: its owner "
            f"could change farpool's keys; farpool refuses it, as ssh does. Fix: "
            f"chown {uid} {shlex.quote(str(path))}, or set {KEY_DIR_ENV} to a directory of your own")


def _unsafe(path: Path, info: os.stat_result, fix: int, why: str) -> SecurityError:
    mode = stat.S_IMODE(info.st_mode)
    return SecurityError(f"unsafe permissions on {path}: mode {mode:04o} {why}; farpool refuses "
                         f"it, as ssh does. Fix: chmod {fix:o} {shlex.quote(str(path))}")


def _check_unused(sock: zmq.Socket, caller: str) -> None:
    # libzmq copies security options into an endpoint when it binds or connects, so
    # settings made afterwards would silently leave that endpoint unprotected.
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise SecurityError(f"{caller}() must come before the socket binds or connects")
