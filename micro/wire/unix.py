"""Unix domain sockets: the native wire between nodes on one host, without TCP.

A node serves the native wire on a Unix socket beside its TCP port and advertises
both in its registry record: ``native`` (``host:port``), ``native_unix`` (the
socket's path) and ``host`` (:func:`host_id`, this host's identity). A client whose
own host id is the node's connects to the path; when the path is unusable (gone,
a stale file nobody listens on, not ours to open, another mount namespace) it
falls back to the TCP address, for good, for that node. Both carry the same
frames with the same semantics (``docs/wire.md``).

No TLS on the socket: its bytes never leave the kernel, and who may connect is
decided by the file system. The sockets live in one directory per user
(:func:`socket_dir`: ``$MICRO_SOCKET_DIR``, else ``micro-{uid}`` in the temporary
directory), created 0700 and refused when it is not (another user could plant
or reach sockets there); each socket is 0600. So only the node's own user
reaches it this way; everyone else uses TCP, with TLS when the node has it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger("micro.wire")

UNIX = "native_unix"
"""The node metadata key of a node's native Unix socket path."""
HOST = "host"
"""The node metadata key of the node's host id (:func:`host_id`)."""

MAX_PATH = 107  # sun_path is 108 bytes on Linux, with its NUL (104 on the BSDs and macOS: the bind fails there)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


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
    """Where this user's nodes put their sockets: ``$MICRO_SOCKET_DIR``, else ``{tmp}/micro-{uid}``."""
    configured = os.environ.get("MICRO_SOCKET_DIR")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"micro-{os.geteuid()}"


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
    a connect is refused), once per process and directory."""
    if where in _swept:
        return
    _swept.add(where)
    for entry in where.glob("*.sock"):
        if stale(str(entry)):
            with contextlib.suppress(OSError):
                entry.unlink()


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
