"""Every error micro raises, in one tree.

::

    MicroError
    ├── Error                      an RPC failed; carries a gRPC status, both ways
    │   ├── BadRequest             INVALID_ARGUMENT  (malformed request; names the field)
    │   ├── NotFound               NOT_FOUND         (unknown service)
    │   │   ├── ServiceNotFound    NOT_FOUND         (also a RegistryError)
    │   │   └── EndpointNotFound   UNIMPLEMENTED     (unknown endpoint)
    │   ├── Conflict               ABORTED           (it changed under you; read again and retry)
    │   │   └── VersionConflict    ABORTED           (also a StoreError: a conditional write lost)
    │   ├── Timeout                DEADLINE_EXCEEDED
    │   ├── Unavailable            UNAVAILABLE       (no reachable node, backend gone)
    │   ├── ResourceExhausted      RESOURCE_EXHAUSTED (oversize message, overload)
    │   ├── Unauthenticated        UNAUTHENTICATED
    │   ├── PermissionDenied       PERMISSION_DENIED
    │   ├── Cancelled              CANCELLED
    │   ├── Internal               INTERNAL          (handler raised; details stay in the server log)
    │   └── Unknown                anything else
    ├── RegistryError              a registry backend failed
    ├── BrokerError                a broker backend failed
    ├── StoreError                 a store backend failed
    │   └── RecordNotFound
    ├── AgentError                 an agent run failed
    └── UsageError                 a developer mistake, raised at construction or start
        └── ConfigError            a bad backend URL or option

A message always says what failed, where, and what to do about it. Errors cross
the wire as a gRPC status and a message: ``Error.from_status`` maps a status back
to the same class, so ``except micro.errors.BadRequest`` works the same whether
the service ran in this process or another.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import ClassVar

from grpclib.const import Status

__all__ = [
    "AgentError",
    "BadRequest",
    "BrokerError",
    "Cancelled",
    "ConfigError",
    "Conflict",
    "EndpointNotFound",
    "Error",
    "Internal",
    "MicroError",
    "NotFound",
    "PermissionDenied",
    "RecordNotFound",
    "RegistryError",
    "ResourceExhausted",
    "ServiceNotFound",
    "Status",
    "StoreError",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "Unknown",
    "UsageError",
    "VersionConflict",
    "closest",
]


class MicroError(Exception):
    """Root of every error raised by micro."""


class Error(MicroError):
    """An RPC failed. ``status`` is the gRPC status it travels as."""

    status: ClassVar[Status] = Status.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The status name, e.g. ``"INVALID_ARGUMENT"``."""
        return self.status.name

    @staticmethod
    def from_status(status: Status, message: str | None) -> Error:
        """The error class for a gRPC status, carrying the peer's message."""
        cls = _BY_STATUS.get(status, Unknown)
        return cls(message or status.name)


class BadRequest(Error):
    """The request did not match the endpoint's type (INVALID_ARGUMENT)."""

    status = Status.INVALID_ARGUMENT


class NotFound(Error):
    """No such service (NOT_FOUND)."""

    status = Status.NOT_FOUND


class RegistryError(MicroError):
    """A registry backend failed."""


class ServiceNotFound(NotFound, RegistryError):
    """The registry has no service of that name."""


class EndpointNotFound(NotFound):
    """The service exists but has no such endpoint (UNIMPLEMENTED)."""

    status = Status.UNIMPLEMENTED


class Conflict(Error):
    """The thing changed under you, or is not in the state the request needs (ABORTED).

    Read it again and retry; the request changed nothing.
    """

    status = Status.ABORTED


class Timeout(Error):
    """The deadline passed before the call finished (DEADLINE_EXCEEDED)."""

    status = Status.DEADLINE_EXCEEDED


class Unavailable(Error):
    """No node answered, or a backend went away (UNAVAILABLE)."""

    status = Status.UNAVAILABLE


class ResourceExhausted(Error):
    """A message over the size limit, or a server over its concurrency limit."""

    status = Status.RESOURCE_EXHAUSTED


class Unauthenticated(Error):
    """No or bad credentials (UNAUTHENTICATED)."""

    status = Status.UNAUTHENTICATED


class PermissionDenied(Error):
    """Credentials do not allow this call (PERMISSION_DENIED)."""

    status = Status.PERMISSION_DENIED


class Cancelled(Error):
    """The caller cancelled the call (CANCELLED)."""

    status = Status.CANCELLED


class Internal(Error):
    """The handler raised. The traceback is in the server's log, never on the wire."""

    status = Status.INTERNAL


class Unknown(Error):
    """A status micro has no class for."""

    status = Status.UNKNOWN


class BrokerError(MicroError):
    """A broker backend failed."""


class StoreError(MicroError):
    """A store backend failed."""


class RecordNotFound(StoreError, KeyError):
    """No record under that key."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "record not found"


class VersionConflict(Conflict, StoreError):
    """A conditional write (``store.write(..., if_version=n)``) found another version; nothing changed.

    ``expected`` is the version the caller named (0: no record); ``current`` the one the
    store holds (0: none; None where the backend does not know it).
    """

    def __init__(
        self, message: str, *, store: str = "", key: str = "", expected: int | None = None, current: int | None = None
    ) -> None:
        super().__init__(message)
        self.store, self.key, self.expected, self.current = store, key, expected, current


class AgentError(MicroError):
    """An agent run failed in a way the model could not recover from."""


class UsageError(MicroError, TypeError):
    """A developer mistake: a bad handler, option or argument."""


class ConfigError(UsageError, ValueError):
    """A bad backend URL or option; the message names the URL and the reason."""


_BY_STATUS: dict[Status, type[Error]] = {
    Status.INVALID_ARGUMENT: BadRequest,
    Status.NOT_FOUND: NotFound,
    Status.UNIMPLEMENTED: EndpointNotFound,
    Status.ABORTED: Conflict,
    Status.DEADLINE_EXCEEDED: Timeout,
    Status.UNAVAILABLE: Unavailable,
    Status.RESOURCE_EXHAUSTED: ResourceExhausted,
    Status.UNAUTHENTICATED: Unauthenticated,
    Status.PERMISSION_DENIED: PermissionDenied,
    Status.CANCELLED: Cancelled,
    Status.INTERNAL: Internal,
}


def closest(name: str, names: Iterable[str]) -> str | None:
    """The name in ``names`` most like ``name`` (a prefix either way, or a near spelling), or None:
    what a not-found error suggests ("did you mean task?").

    Example::

        closest("tsk", ["task", "project"])  # "task"
    """
    names = sorted(set(names))
    starts = [n for n in names if name and (n.startswith(name) or name.startswith(n))]
    if starts:
        return min(starts, key=lambda n: (abs(len(n) - len(name)), n))
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None
