"""Keys: the key directory, cluster key files, and the ssh-like checks on both.

Where the keys live::

    scheduler host                                remote host (worker or client)
    $FARPOOL_KEY_DIR or ~/.config/farpool/keys    --key-file PATH, or $FARPOOL_KEY
      server.key_secret  the scheduler's pair       server-public = ...
      client.key_secret  this host's client pair    client-public = ...
      authorized/*.key   allowed client keys        client-secret = ...
      issued/NAME.cluster-key ──── copied ───────▶  (written by keygen())

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
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shlex
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import zmq
from zmq.utils import z85

try:
    import fcntl
except ImportError:  # Windows: no flock; first use there is not guarded against races
    fcntl = None  # type: ignore[assignment]

from farpool.errors import SecurityError
from farpool.security.curve import require_curve

__all__ = [
    "KEY_DIR_ENV",
    "KEY_ENV",
    "ClusterKeys",
    "KeyPair",
    "client_keys",
    "default_key_dir",
    "ensure_keys",
    "format_key_file",
    "keygen",
    "load_authorized",
    "load_key_file",
    "load_key_roles",
    "KeyRole",
    "ROLES",
    "parse_key_file",
    "write_key_file",
]

KEY_DIR_ENV = "FARPOOL_KEY_DIR"
KEY_ENV = "FARPOOL_KEY"

_POSIX = hasattr(os, "geteuid")  # ownership and mode bits mean nothing on Windows
_MAX_KEY_FILE = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CLUSTER_FIELDS = ("server-public", "client-public", "client-secret")


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
            _write_private(authorized / "local.key",
                           _cert_text(KeyPair(client.public), "client", role="operator"), replace=True)
        return ClusterKeys(server, client, load_authorized(directory), directory)


class KeyRole(NamedTuple):
    """What an allowed key may do (``role``: one of ROLES), and which file said so."""

    role: str
    name: str
    """The file's name without ``.key``."""
    legacy: bool
    """The file names no role (made before roles existed): it may do anything."""


# A client key submits tasks; a worker key runs them (a `farpool worker` host and its
# processes); an operator key does both and reads the whole status (this host's own).
ROLES = ("client", "worker", "operator")


def load_authorized(key_dir: str | os.PathLike[str] | None = None) -> list[bytes]:
    """The allowed public keys of ``key_dir``: one per ``authorized/*.key`` file.

    Call it again (and pass the result to :meth:`Authenticator.allow`) to pick up keys
    added or removed since; the order is by file name, duplicates dropped.
    """
    return list(load_key_roles(key_dir))


def load_key_roles(key_dir: str | os.PathLike[str] | None = None) -> dict[bytes, KeyRole]:
    """The allowed public keys of ``key_dir`` with their roles, in file-name order.

    A key file's role is its ``role = ...`` line (``farpool keygen --role``). A file
    without one was made before roles: it is an operator key (the migration keeps old
    key directories working; ``legacy`` says so, and the scheduler warns at start).
    ``local.key``, this host's own key, is an operator key.
    """
    directory = Path(key_dir if key_dir is not None else default_key_dir()).expanduser().absolute()
    _check_key_dir(directory)
    authorized = directory / "authorized"
    _check_dir(authorized)
    keys: dict[bytes, KeyRole] = {}
    for path in sorted(authorized.glob("*.key")):
        text = _read_checked(path, secret=False)
        fields = _fields(text, str(path), ("public-key", "role"))
        if "public-key" in fields:
            key = _z85_key(fields["public-key"], "public-key", str(path))
        else:  # a file holding one bare key
            key = _z85_key(text.strip(), "public key", str(path))
        role = fields.get("role")
        if role is not None and role not in ROLES:
            raise SecurityError(f"{path}: role {role[:20]!r} is not one of {', '.join(ROLES)}")
        name = path.name[: -len(".key")]
        if key not in keys:
            keys[key] = KeyRole(role or "operator", name, role is None and name != "local")
    return keys


def keygen(key_dir: str | os.PathLike[str] | None = None, *, name: str = "client",
           role: str = "client") -> Path:
    """Make a new key pair, authorize it for ``role`` (see ROLES), and write a cluster
    key file for a remote host.

    The public key goes to ``authorized/NAME.key`` (``NAME-2``, ``NAME-3``... if taken)
    and the cluster key file to ``issued/NAME.cluster-key``, whose path is returned:
    copy it to the remote host (keeping it private) and pass it as ``--key-file`` or
    ``$FARPOOL_KEY``. A running scheduler sees the new key once it reloads its allow-list
    (:func:`load_authorized`). Revoke by deleting ``authorized/NAME.key``.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    if role not in ROLES:
        raise ValueError(f"key role {role!r}: one of {', '.join(ROLES)}")
    keys = ensure_keys(key_dir)
    issued = keys.key_dir / "issued"
    _make_private_dir(issued)
    pair = KeyPair.generate()
    public_text = _cert_text(KeyPair(pair.public), name, role=role)
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


def revoke(key_dir: str | os.PathLike[str] | None, name: str) -> list[Path]:
    """Revoke the key ``name``: delete ``authorized/NAME.key`` and its issued key file.
    A running scheduler refuses it at its next reload (every few seconds) and cuts the
    connections made with it. Returns the files removed."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    if name == "local":
        raise ValueError("'local' is this host's own key (the scheduler's operator key): "
                         "revoking it would lock this host out; delete the key directory to "
                         "start over instead")
    keys_dir = Path(key_dir) if key_dir is not None else default_key_dir()
    authorized = keys_dir / "authorized" / f"{name}.key"
    if not authorized.exists():
        names = sorted(p.stem for p in (keys_dir / "authorized").glob("*.key"))
        raise ValueError(f"no key named {name!r} in {keys_dir / 'authorized'} (there are: "
                         f"{', '.join(names) or 'none'})")
    removed = [authorized]
    authorized.unlink()
    issued = keys_dir / "issued" / f"{name}.cluster-key"
    if issued.exists():
        issued.unlink()
        removed.append(issued)
    return removed


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


def _cert_text(pair: KeyPair, name: str, *, role: str | None = None) -> str:
    kind = "public" if pair.secret is None else "SECRET"
    lines = [f"#   farpool CURVE {kind} certificate ({name}), ZPL format as czmq and pyzmq write it",
             "#   Keep this file to yourself (mode 0600)." if pair.secret else "#",
             "", "metadata"]
    if role is not None:
        lines.append(f'    role = "{role}"')
    lines += ["curve", f'    public-key = "{pair.public.decode()}"']
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
