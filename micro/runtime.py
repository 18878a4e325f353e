"""The Runtime: the registry, broker, store and client that one event loop shares.

Every service, agent and flow on a loop runs in one Runtime, which is how a call
between two of them takes the in-process fast path. ``micro.New(...)`` uses the
loop's shared runtime (``Runtime.current()``), opened by the first service that
starts and closed when the last one stops; pass ``runtime=`` to use your own.

Backends come from keyword arguments (a URL or an instance) or from
``MICRO_REGISTRY`` / ``MICRO_BROKER`` / ``MICRO_STORE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar

import anyio
import anyio.abc

from micro import registry as _registry
from micro.client import Client
from micro.delivery import RuntimeDelivery
from micro.errors import MicroError, UsageError
from micro.health import DEFAULT_INTERVAL, Backends
from micro.middleware import Wrapper
from micro.registry import Registry
from micro.resource import Resource, redact
from micro.tasks import BackgroundTasks

if TYPE_CHECKING:
    from micro.broker import Broker
    from micro.service.endpoints import Endpoint
    from micro.store import Store

log = logging.getLogger("micro.runtime")


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = weakref.WeakKeyDictionary()


class Runtime(Resource):
    """Registry, broker, store and client shared by everything on one loop.

    A :class:`~micro.resource.Resource`: each ``async with`` (or :meth:`acquire`) takes a
    reference, the first opens the backends (store, registry, broker, in that order),
    the last :meth:`release` closes them; :meth:`aclose` closes now.

    Args:
        registry: a :class:`~micro.registry.Registry` or URL (default ``$MICRO_REGISTRY`` or ``local://``).
        broker: a :class:`~micro.broker.Broker` or URL (default ``$MICRO_BROKER``).
        store: a :class:`~micro.store.Store` or URL (default ``$MICRO_STORE`` or the file store).
        call_wrappers: client middleware applied to every call made through this runtime.
        default_timeout: seconds a call may take when the caller gives no timeout.
        tls: the client TLS context for services that serve TLS (see :mod:`micro.tls`).
        transport: the wire to other processes' nodes: ``"auto"`` (micro's native wire where a
            node advertises it, gRPC elsewhere), ``"grpc"`` or ``"native"`` (default ``$MICRO_TRANSPORT``
            or ``"auto"``; see ``docs/wire.md``).
        health_interval: seconds between the checks of the backends (:attr:`backends`, see
            :mod:`micro.health`): while one does not answer, the runtime's services are NOT_SERVING.

    Example::

        async with micro.Runtime(registry="memory://", store="memory://") as rt:
            async with micro.New("task", runtime=rt) as svc:
                ...
    """

    kind: ClassVar[str] = "runtime"
    error: ClassVar[type[MicroError]] = UsageError

    def __init__(self, *, registry: Registry | str | None = None, broker: Broker | str | None = None,
                 store: Store | str | None = None, call_wrappers: Sequence[Wrapper] = (),
                 default_timeout: float | None = 60.0, tls: ssl.SSLContext | None = None,
                 transport: str | None = None, health_interval: float = DEFAULT_INTERVAL) -> None:
        from micro import broker as _broker
        from micro import store as _store

        self.registry: Registry = registry if isinstance(registry, Registry) else _registry.from_url(registry)
        self.broker: Broker = broker if isinstance(broker, _broker.Broker) else _broker.from_url(broker)
        self.store: Store = store if isinstance(store, _store.Store) else _store.from_url(store)
        self.local: dict[str, dict[str, Endpoint]] = {}
        self.client = Client(
            self.registry, local=self.local, wrappers=call_wrappers,
            default_timeout=default_timeout, publish=self.broker.publish, tls=tls, transport=transport,
        )
        self.backends = Backends(self, health_interval)
        """Whether the registry, store and broker answer (checked while the runtime is open)."""
        self.delivery = RuntimeDelivery(self.registry, self.client, self.backends)
        """What a broker that delivers through the runtime (``local://``) uses."""
        self.broker.attach(self)
        self.url = self.registry.url
        self._stack: contextlib.AsyncExitStack | None = None
        self._background: BackgroundTasks | None = None

    @classmethod
    def current(cls) -> Runtime:
        """The shared runtime of the running loop (created on first use, opened by its first user)."""
        loop = asyncio.get_running_loop()
        rt = _by_loop.get(loop)
        if rt is None:
            rt = _by_loop[loop] = cls()
        return rt

    @classmethod
    def installed(cls) -> Runtime | None:
        """The running loop's shared runtime if there is one yet (this does not create it)."""
        return _by_loop.get(asyncio.get_running_loop())

    @contextlib.contextmanager
    def install(self) -> Iterator[None]:
        """Make this the running loop's shared runtime inside the block (what :meth:`current` returns,
        and so what services built without ``runtime=`` join); the previous one comes back after."""
        loop = asyncio.get_running_loop()
        previous = _by_loop.get(loop)
        _by_loop[loop] = self
        try:
            yield
        finally:
            if previous is not None:
                _by_loop[loop] = previous
            elif _by_loop.get(loop) is self:
                del _by_loop[loop]

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The task group that owns the runtime's background work (open while the runtime is)."""
        if self._background is None:
            raise UsageError("the runtime is not open: use `async with` on it or on a service")
        return self._background.task_group

    async def _open(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self.store)
            await stack.enter_async_context(self.registry)
            await stack.enter_async_context(self.broker)
            stack.callback(self.client.close)
            background = BackgroundTasks(f"runtime {redact(self.registry.url)}", log)
            await background.start()
            stack.push_async_callback(background.aclose)
            self.backends.supervised.add(background)  # its failure streaks count against readiness
            stack.callback(self.backends.supervised.discard, background)
            background.supervise(self._follow, name="registry watch")
            background.supervise(self.backends.watch, name="backend checks")
        except BaseException:
            await stack.aclose()
            raise
        self._background = background
        self._stack = stack

    async def _follow(self) -> None:
        """Keep the client's cache in step with the registry (supervised: a failed watch starts anew)."""
        watcher = self.registry.watch()
        try:
            await self.client.follow(watcher)
        finally:
            await watcher.aclose()

    async def _close(self) -> None:
        stack, self._stack = self._stack, None
        self._background = None
        if stack is not None:
            await stack.aclose()
        loop = asyncio.get_running_loop()
        if _by_loop.get(loop) is self:
            del _by_loop[loop]

    def add_local(self, service: str, endpoints: dict[str, Endpoint]) -> None:
        """Make a service's endpoints reachable by the in-process fast path."""
        self.local[service] = endpoints

    def remove_local(self, service: str, endpoints: dict[str, Endpoint]) -> None:
        if self.local.get(service) is endpoints:
            del self.local[service]

    def __repr__(self) -> str:
        return f"<Runtime registry={self.registry.url!r} users={self._users}>"

