"""Idempotent endpoints: a call that carries an idempotency key runs once; repeats get the first answer.

A caller that may send the same request twice (a flow on redelivery, a client
retrying after a timeout) puts a key in the call metadata::

    await client.call("billing", "Billing.Charge", req, metadata={"idempotency-key": f"order-{order_id}"})

A service opts in, for all its endpoints or some::

    billing = micro.New("billing")
    billing.handle(Billing())
    idempotency.enable(billing)                                   # every endpoint
    idempotency.enable(billing, endpoints=["Billing.Charge"], ttl=3600)

The first call with a key runs the handler and remembers its response in the
runtime's store under ``idempotency/{service}/{endpoint}/{sha256(key)}`` for
``ttl`` seconds (a day by default); a later call with the same key to the same
endpoint gets that response back without running the handler. Calls without a
key run as usual. A handler that needs the key itself reads :func:`current_key`.

Once the handler has answered, its answer is stored even if the caller has gone away meanwhile
(the write runs in a task of its own that the call's cancellation does not reach, for up to
:data:`REMEMBER_TIMEOUT`; the key stays busy until then): the retry of a crashed caller finds it.
What it does not do: errors are not remembered (a retry runs again); streaming endpoints are passed
through; concurrent calls with one key in one process wait for the first, but two processes racing
with one key before the first answer is stored both run (the store has no compare-and-set). Flows
deliver one event at a time per key, which is the case this is for.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from micro import context
from micro.codec import encode_json
from micro.errors import RecordNotFound
from micro.middleware import Next, Request, Wrapper

if TYPE_CHECKING:
    from micro.service import Service
    from micro.store import Store

__all__ = ["DEFAULT_TTL", "KEY", "PREFIX", "REMEMBER_TIMEOUT", "current_key", "derived_key", "enable", "store_key",
           "wrapper"]

log = logging.getLogger("micro.idempotency")

REMEMBER_TIMEOUT = 10.0
"""Seconds storing an answer may take once its caller has gone (then it is given up, logged)."""

KEY = "idempotency-key"
"""The call metadata key that carries the idempotency key."""

PREFIX = "idempotency/"
"""Where remembered responses live in the store."""

DEFAULT_TTL = 24 * 3600.0
"""Seconds a response is remembered by default."""


def current_key() -> str | None:
    """The idempotency key of the call being handled, if it carries one."""
    return context.metadata().get(KEY) or None


def derived_key(key: str, service: str, endpoint: str, args: object) -> str:
    """The key of one call made on behalf of a keyed call or event: ``{key}:{service}.{endpoint}:{digest}``.

    The same arguments give the same key, so a retried flow event or ``Agent.Chat``
    repeats none of the calls the first attempt completed (at services that honour keys).
    """
    digest = hashlib.sha256(msgspec.json.encode(args, order="sorted")).hexdigest()[:16]
    return f"{key}:{service}.{endpoint}:{digest}"


def store_key(service: str, endpoint: str, key: str) -> str:
    """The store key of the response remembered for ``key`` (the key is hashed: any text is safe)."""
    return f"{PREFIX}{service}/{endpoint}/{hashlib.sha256(key.encode()).hexdigest()}"


def wrapper(store: Store | Callable[[], Store], *, ttl: float | None = DEFAULT_TTL,
            endpoints: Collection[str] | None = None) -> Wrapper:
    """Handler middleware that honours idempotency keys (see the module docstring).

    Args:
        store: where responses are remembered, or a function returning it at call time.
        ttl: seconds to remember a response (None: until deleted).
        endpoints: only these endpoints (``"Handler.Method"``); default all.
    """
    inflight: dict[str, asyncio.Event] = {}
    storing: set[asyncio.Task[None]] = set()  # answers still being stored after their callers left
    only = None if endpoints is None else frozenset(endpoints)

    def settle(skey: str, done: asyncio.Event) -> None:
        del inflight[skey]
        done.set()

    def wrap(next_: Next) -> Next:
        async def handle(req: Request) -> Any:
            key = req.metadata.get(KEY)
            if not key or req.streaming or (only is not None and req.endpoint not in only):
                return await next_(req)
            skey = store_key(req.service, req.endpoint, key)
            while (busy := inflight.get(skey)) is not None:
                await busy.wait()  # the same key is being handled: wait for its answer
            done = inflight[skey] = asyncio.Event()  # no await between the check and this
            write: asyncio.Task[None] | None = None
            try:
                st = store() if callable(store) else store
                try:
                    (record,) = await st.read(skey)
                except RecordNotFound:
                    pass
                else:
                    return msgspec.json.decode(record.value)  # converted to the response type by the endpoint
                result = await next_(req)
                # The work is done: its answer is remembered even if the caller goes away now (a crashed
                # agent's connection cancels the call), or its retry with this key would do the work again.
                # The write runs in a task of its own: grpclib cancels a call with Task.cancel() (a reset stream,
                # a deadline, a stop), which no cancel scope shields from; the key stays busy until the write
                # has settled. (The native wire and the in-process deadline respect shields: micro.cancel.)
                write = asyncio.get_running_loop().create_task(_remember(st, skey, result, ttl, req))
                await asyncio.shield(write)
                return result
            finally:
                if write is None or write.done():
                    settle(skey, done)
                else:  # the caller left while the answer was being stored: a retry waits for the write
                    storing.add(write)
                    write.add_done_callback(storing.discard)
                    write.add_done_callback(lambda _: settle(skey, done))

        return handle

    return wrap


async def _remember(store: Store, skey: str, result: Any, ttl: float | None, req: Request) -> None:
    from micro.store import Record

    try:
        with anyio.fail_after(REMEMBER_TIMEOUT):
            await store.write(Record(skey, encode_json(result), {"endpoint": f"{req.service} {req.endpoint}"}),
                              ttl=ttl)
    except TimeoutError:
        log.warning("%s %s: the response of an idempotent call was not stored within %g s",
                    req.service, req.endpoint, REMEMBER_TIMEOUT)
    except Exception:
        # The work is done; failing the call now would only make the caller retry it.
        log.warning("%s %s: could not remember the response of an idempotent call", req.service, req.endpoint,
                    exc_info=True)


def enable(service: Service, *, ttl: float | None = DEFAULT_TTL, endpoints: Collection[str] | None = None) -> None:
    """Honour idempotency keys on ``service``'s endpoints, remembering responses in its runtime's store.

    Covers the endpoints handled so far and those handled later.

    Example::

        task = micro.New("task")
        task.handle(Task())
        idempotency.enable(task, endpoints=["Task.Create"])
    """
    service.handler_wrappers.append(wrapper(lambda: service.runtime.store, ttl=ttl, endpoints=endpoints))
    for ep in service.endpoints.values():
        ep.wrap(service.handler_wrappers)
