"""CURVE on sockets and the ZAP authenticator: who may talk to a farpool server socket.

Unpickling runs code, and a plain ZeroMQ TCP socket takes bytes from anyone who can
reach it (libzmq even accepts raw ZMTP/1.0 frames with no handshake, and on loopback
every local user can reach it). So every network-facing farpool socket uses CURVE
(libsodium, through libzmq) *and* an allow-list of client public keys, checked by an
:class:`Authenticator` answering ZAP requests: knowing the server's public key is not
enough. A refused peer is dropped in the handshake, before libzmq hands farpool a
single frame from it::

    ROUTER  configure_server(sock, keys)    ◀─CURVE─  DEALER  configure_client(sock, ...)
      │ ZAP request: mechanism, client public key
      ▼
    Authenticator thread on inproc://zeromq.zap.01: CURVE and an allowed key -> 200,
    anything else (NULL, PLAIN, unknown key, other domain) -> 400, counted and logged

Rules for callers (scheduler, worker, client): call :func:`require_curve` before
opening a network socket; start an :class:`Authenticator` on the context *before*
:func:`configure_server`; configure sockets before ``bind``/``connect``; close server
sockets before stopping the authenticator. ``ipc://`` and ``inproc://`` endpoints rely
on file-system permissions instead (:func:`requires_keys`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple, TextIO

import zmq
from zmq.utils import z85

from farpool.errors import SecurityError
from farpool.log_limit import OncePerSecond
from farpool.security.curve import require_curve
from farpool.security.keys import ClusterKeys, KeyPair, _z85_key, default_key_dir

__all__ = [
    "ZAP_DOMAIN",
    "ZAP_ENDPOINT",
    "Authenticator",
    "ZapVerdict",
    "configure_client",
    "configure_server",
    "HandshakeVerdicts",
    "describe_handshake_failure",
    "handshake_failures",
    "insecure_warning",
    "require_curve",
    "requires_keys",
    "warn_insecure",
    "zap_verdict",
]

log = logging.getLogger(__name__)

#: The ZAP domain farpool's server sockets use; the authenticator refuses any other.
ZAP_DOMAIN = b"farpool"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"

_ZAP_VERSION = b"1.0"
_STOP = b"STOP"


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
    if (event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH):
        return ("the scheduler and this host disagree on security: one of them uses CURVE "
                "keys and the other runs without them (--insecure, or insecure=True); use "
                "keys on both sides (see `farpool keygen`), or --insecure on both")
    if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
        return ("the security handshake with the scheduler failed: the server public key is "
                "probably wrong (a key file from another scheduler?), or the scheduler runs "
                "without keys (--insecure)")
    return None


HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
# Failures without detail in a row (no success between) before they are a verdict.
UNDETAILED_FAILURES_FINAL = 3


class HandshakeVerdicts:
    """Which failed handshakes are a refusal to act on, and which may pass.

    A refused key (AUTH) or CURVE on one side only (a mechanism mismatch) is final at
    once. A failure without detail is what a wrong server key gives, but also what a
    connection cut in the middle of a handshake gives (a scheduler restarting): it is
    final only after ``UNDETAILED_FAILURES_FINAL`` of them in a row, with no successful
    handshake between. No sockets: fed monitor events, it says what they mean.
    """

    def __init__(self) -> None:
        self.undetailed = 0

    def event(self, event: int, value: int = 0) -> str | None:
        """The reason to give up on the scheduler, if this event makes one."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.undetailed = 0
            return None
        why = describe_handshake_failure(event, value)
        if why is None or event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return why
        if (event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH):
            return why
        self.undetailed += 1
        return why if self.undetailed >= UNDETAILED_FAILURES_FINAL else None


def watch_handshakes(sock: zmq.Socket) -> zmq.Socket:
    """A monitor of ``sock``'s security handshakes, to read with
    :func:`handshake_failures`. Call it before ``connect``: a refused peer is otherwise
    silence, and a send to it blocks (libzmq drops the pipe of a failed handshake)."""
    return sock.get_monitor_socket(HANDSHAKE_FAILURES)


def handshake_failures(monitor: zmq.Socket, verdicts: HandshakeVerdicts) -> list[str]:
    """The refusals the events waiting on a socket monitor make final (see
    :class:`HandshakeVerdicts`), without waiting."""
    from zmq.utils.monitor import recv_monitor_message

    found: list[str] = []
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return found
        why = verdicts.event(event["event"], event["value"])
        if why is not None:
            found.append(why)


def user_id(frame: Any) -> bytes | None:
    """The CURVE public key (Z85) ZAP admitted a received frame's sender with."""
    try:
        return str(frame.get("User-Id")).encode()
    except (zmq.ZMQError, AttributeError):
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
        self._refusal_log = OncePerSecond()

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
            _bind_when_free(zap, ZAP_ENDPOINT)
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
        # Counted before the reply: once the reply is out, the peer's first message can
        # arrive (and a reader of the counts look) before this thread runs again.
        if verdict.allowed:
            self.accepted += 1
        else:
            self.refused += 1
        zap.send_multipart([_ZAP_VERSION, request_id, verdict.status, verdict.text, verdict.user_id, b""])
        if verdict.allowed:
            log.debug("ZAP %s", verdict.detail)
            return
        # Throttled: a peer hammering the port must not flood the log.
        more = self._refusal_log.passes(time.monotonic())
        if more is not None:
            log.warning("refused a connection %s%s", verdict.detail,
                        f" ({more} more refused since the last report)" if more else "")


# -- helpers ---------------------------------------------------------------------------------


def _bind_when_free(sock: zmq.Socket, endpoint: str, patience: float = 2.0) -> None:
    # A closed socket's inproc name is released by libzmq's reaper thread, a moment
    # after close() returns; so a new authenticator started right after the last one
    # stopped can see EADDRINUSE for its own, already-released name. Retry briefly.
    deadline = time.monotonic() + patience
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as error:
            if error.errno != zmq.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _check_unused(sock: zmq.Socket, caller: str) -> None:
    # libzmq copies security options into an endpoint when it binds or connects, so
    # settings made afterwards would silently leave that endpoint unprotected.
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise SecurityError(f"{caller}() must come before the socket binds or connects")
