"""Unix domain sockets: the native wire between nodes on one host, without TCP.

A node serves the native wire on a Unix socket beside its TCP port and advertises
both in its registry record: ``native`` (``host:port``), ``native_unix`` (the
socket's path) and ``host`` (:func:`host_id`, this host's identity). A client whose
own host id is the node's connects to the path; when the path is unusable (gone,
a stale file nobody listens on, not ours to open, another mount namespace) it
falls back to the TCP address for that node (see below). Both carry the same
frames with the same semantics (``docs/wire.md``).

No TLS on the socket: its bytes never leave the kernel, and who may connect is
decided by the file system. The sockets live in one directory per user
(:func:`socket_dir`: ``$MICRO_SOCKET_DIR``, else ``micro-{uid}`` in the temporary
directory), created 0700 and refused when it is not (another user could plant
or reach sockets there); each socket is 0600. So only the node's own user
reaches it this way; everyone else uses TCP, with TLS when the node has it.

The directory is micro's: a node binds its socket under a temporary name, listens,
then renames it into place (so a socket at a node's name always listens), and removes
at start the sockets other nodes left behind when they died, recognised by their
names (a node id's twelve hex digits and ``.sock``, or ``.`` + those digits + ``.tmp`` for one
that died between bind and rename; nothing else there is touched).
A client takes only paths in its own socket directory (a registry record naming
another place is ignored) and, where the system tells (``SO_PEERCRED``, Linux), only
a socket whose listening process runs as its own user; when the socket is unusable,
or the connection fails before the wire's handshake, it uses TCP for that attempt
and tries the socket again after :data:`RETRY` seconds (said once in the log).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import struct
import tempfile
import time
from functools import cache
from pathlib import Path

log = logging.getLogger("micro.wire")

UNIX = "native_unix"
"""The node metadata key of a node's native Unix socket path."""
HOST = "host"
"""The node metadata key of the node's host id (:func:`host_id`)."""

RETRY = 30.0
"""Seconds a client uses TCP after a node's Unix socket failed, before it tries the socket again."""

MAX_PATH = 107  # sun_path is 108 bytes on Linux, with its NUL (104 on the BSDs and macOS: the bind fails there)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_NODE_SOCKET = re.compile(r"[0-9a-f]{12}\.sock")  # what listen_path names a node's socket
_NODE_TEMPORARY = re.compile(r"\.[0-9a-f]{12}\.tmp")  # and what bind names it until it listens

TEMPORARY_AGE = 60.0
"""Seconds after which a node's temporary socket (bound, not yet renamed) that nobody listens on is swept:
a node lives at that name for the moments between its bind and its rename, unlistening until it listens."""


@cache
def host_id() -> str:
    """This host's identity: the kernel's boot id on Linux (shared by the containers on one kernel, which
    may share a socket directory), else the host name. Two processes with the same id may reach each
    other's Unix sockets; the client still falls back to TCP when they cannot."""
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return f"boot:{boot}" if boot else f"name:{socket.gethostname()}"


def socket_dir() -> Path:
    """Where this user's nodes put their sockets: ``$MICRO_SOCKET_DIR`` (made absolute: the path is
    advertised to other processes), else ``{tmp}/micro-{uid}``. The directory is micro's alone."""
    configured = os.environ.get("MICRO_SOCKET_DIR")
    if configured:
        return Path(configured).absolute()
    return Path(tempfile.gettempdir()) / f"micro-{os.geteuid()}"


def ours(path: str) -> bool:
    """Whether ``path`` is a socket in this process's :func:`socket_dir` (symbolic links resolved): a client
    connects to no other path a registry record may name."""
    try:
        return Path(path).resolve().parent == socket_dir().resolve()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symbolic link loop; ValueError: a NUL
        return False


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end of a connected Unix socket, or ``None`` where the system
    does not say (``SO_PEERCRED`` is Linux's; elsewhere the directory's 0700 mode is the only check)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except (OSError, AttributeError):  # AttributeError: a transport's socket stand-in without getsockopt
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def bind(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600), bound under a temporary name and renamed into place
    once it listens, so that no one ever finds a socket at a node's name that refuses connections (the
    stale-socket sweep of a node starting beside it would remove it)."""
    where, name = os.path.split(path)
    temporary = os.path.join(where, f".{name.removesuffix('.sock')}.tmp")  # as long as the path itself
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # left by a node of this id that died between bind and rename
        sock.bind(temporary)
        try:
            os.chmod(temporary, 0o600)  # the directory is private already; the socket too
            sock.listen(4096)
            os.rename(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError:
        sock.close()
        raise
    return sock


def listen_path(node_id: str) -> str | None:
    """A fresh socket path for ``node_id`` in :func:`socket_dir`, or ``None`` (logged) when the directory
    cannot be made private or the path would be too long; stale sockets there are removed first."""
    where = socket_dir()
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(where)
    except OSError as exc:
        log.warning("native wire: no Unix socket (%s: %s); calls from this host use TCP", where, exc)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("native wire: no Unix socket: %s must be a directory of this user (uid %d) that no one "
                    "else may read or write (mode 0700; it is %s, owned by uid %d): fix it, or set "
                    "MICRO_SOCKET_DIR to such a directory; calls from this host use TCP meanwhile",
                    where, os.geteuid(), stat.filemode(st.st_mode), st.st_uid)
        return None
    _sweep_once(where)
    path = str(where / f"{node_id.rsplit('-', 1)[-1]}.sock")
    if len(os.fsencode(path)) > MAX_PATH:
        log.warning("native wire: no Unix socket: %s is longer than %d bytes: set MICRO_SOCKET_DIR to a "
                    "shorter directory; calls from this host use TCP meanwhile", path, MAX_PATH)
        return None
    return path


_swept: set[Path] = set()


def _sweep_once(where: Path) -> None:
    """Remove the sockets left in ``where`` by nodes that died without removing theirs (nobody listens:
    a connect is refused), once per process and directory; and the temporary sockets of nodes that died
    between bind and rename (nobody listens, and older than :data:`TEMPORARY_AGE`). Only names a node gives
    its sockets are looked at: another program's socket in a shared directory is left alone."""
    if where in _swept:
        return
    _swept.add(where)
    try:
        names = os.listdir(where)
    except OSError:
        return
    now = time.time()
    for name in names:
        entry = where / name
        if _NODE_SOCKET.fullmatch(name):
            dead = stale(str(entry))
        elif _NODE_TEMPORARY.fullmatch(name):  # a node that died between its bind and its rename; one that is
            # starting now has not listened yet either, but its file is moments old
            dead = _age(entry, now) > TEMPORARY_AGE and stale(str(entry))
        else:
            continue
        if dead:
            with contextlib.suppress(OSError):
                entry.unlink()


def _age(path: Path, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def stale(path: str) -> bool:
    """A socket file that nobody listens on (its node died without removing it)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError as exc:
            return exc.errno == errno.ECONNREFUSED
    return False


def remove(path: str, inode: int) -> None:
    """Remove the socket at ``path`` if it is still the one this node bound (``inode``)."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
