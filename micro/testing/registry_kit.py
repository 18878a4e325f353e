"""The registry conformance kit: the behaviour every registry backend must show.

A backend passes when every check in :data:`CHECKS` passes against it; the memory
registry runs it too, so the in-process double cannot drift from the real backends.
Each check gets a factory returning a new, unopened registry, and uses service names
of its own (``kit-<random>…``), so one server or directory can serve many runs.
Waits are bounded by :data:`TIMEOUT` and nothing sleeps: expiry is awaited as the
watcher's ``delete`` event::

    from micro.testing.registry_kit import CHECKS, check_registry

    await check_registry(lambda: MyRegistry("my://server", poll_interval=0.05))

    @pytest.mark.parametrize("check", CHECKS)                  # or one test each
    async def test_my_registry(check):
        await CHECKS[check](make_registry)
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable

import anyio

from micro.errors import NotFound, RegistryError, ServiceNotFound, UsageError
from micro.registry import Endpoint, Event, Node, Registry, ServiceRecord, Watcher

__all__ = ["CHECKS", "TIMEOUT", "RegistryFactory", "check_registry"]

RegistryFactory = Callable[[], Registry]
TIMEOUT = 10.0
"""Seconds any single wait in a check may take before the check fails."""


def _name(suffix: str = "") -> str:
    return f"kit-{uuid.uuid4().hex[:10]}{suffix}"


def _record(name: str, node: str = "n1", *, version: str = "latest", port: int = 1,
            description: str = "list overdue tasks") -> ServiceRecord:
    return ServiceRecord(
        name=name, version=version, metadata={"team": "core"},
        endpoints=[Endpoint(name="Task.List", path=f"/{name}.Task/List",
                            request={"type": "object", "properties": {"user_id": {"type": "string"}}},
                            response={"type": "object"}, description=description)],
        nodes=[Node(id=node, address=f"127.0.0.1:{port}", metadata={"pid": "1"})],
    )


async def _next(watcher: Watcher, type_: str, name: str, node: str | None = None) -> Event:
    """The next event of that type for that service (and node); fails after TIMEOUT."""
    try:
        with anyio.fail_after(TIMEOUT):
            async for event in watcher:
                if event.type == type_ and event.service.name == name and (
                        node is None or any(n.id == node for n in event.service.nodes)):
                    return event
    except TimeoutError:
        raise AssertionError(f"no {type_!r} event for {name!r} within {TIMEOUT:g} s") from None
    raise AssertionError("the watcher ended")


async def _refuses(action: Callable[[], Awaitable[object]], error: type[Exception], what: str) -> Exception:
    try:
        await action()
    except error as exc:
        return exc
    raise AssertionError(f"{what} should raise {error.__name__}")


async def check_lifecycle(make_registry: RegistryFactory) -> None:
    """Use before ``async with`` and after ``aclose`` fails clearly; entering twice takes two
    references; ``aclose`` is idempotent; a closed registry opens again."""
    registry = make_registry()
    name = _name()
    await _refuses(lambda: registry.list(), RegistryError, "list() before async with")
    async with registry as entered:
        assert entered is registry
        async with registry:  # a second reference
            await registry.register(_record(name), ttl=30)
        assert [r.name for r in await registry.get(name)] == [name], "leaving the inner block closed it"
    refused = await _refuses(lambda: registry.get(name), RegistryError, "get() after the last exit")
    assert not isinstance(refused, ServiceNotFound), refused
    await registry.aclose()
    await registry.aclose()
    async with registry:  # opens again
        await registry.deregister(_record(name))
        await registry.aclose()
    await _refuses(lambda: registry.register(_record(name), ttl=30), RegistryError, "register() after aclose")


async def check_register_get_list_deregister(make_registry: RegistryFactory) -> None:
    """A registered record comes back whole from ``get`` and ``list``; deregistering removes it."""
    name = _name()
    rec = _record(name)
    async with make_registry() as registry:
        await registry.register(rec, ttl=30)
        assert await registry.get(name) == [rec]
        assert [r for r in await registry.list() if r.name == name] == [rec]
        await registry.deregister(rec)
        await _refuses(lambda: registry.get(name), ServiceNotFound, "get() after deregister")
        assert [r for r in await registry.list() if r.name == name] == []
        await registry.deregister(rec)  # not registered: not an error


async def check_not_found(make_registry: RegistryFactory) -> None:
    """An unknown service is ``ServiceNotFound`` (a ``NotFound`` and a ``RegistryError``) naming it."""
    name = _name()
    async with make_registry() as registry:
        try:
            await registry.get(name)
        except ServiceNotFound as exc:
            assert isinstance(exc, NotFound) and isinstance(exc, RegistryError)
            assert repr(name) in str(exc) and exc.code == "NOT_FOUND", exc
        else:
            raise AssertionError("get() of an unknown service should raise ServiceNotFound")


async def check_merge(make_registry: RegistryFactory) -> None:
    """Nodes of one name and version merge into one record; versions stay apart; sorted."""
    name = _name()
    async with make_registry() as registry:
        await registry.register(_record(name, "a", port=1), ttl=30)
        await registry.register(_record(name, "b", port=2), ttl=30)
        await registry.register(_record(name, "c", port=3, version="2.0"), ttl=30)
        got = await registry.get(name)
        assert [(r.version, sorted(n.id for n in r.nodes)) for r in got] == [("2.0", ["c"]), ("latest", ["a", "b"])]
        assert [(r.name, r.version) for r in await registry.list() if r.name == name] == [
            (name, "2.0"), (name, "latest")]
        await registry.deregister(_record(name, "a"))
        latest = [r for r in await registry.get(name) if r.version == "latest"]
        assert [n.id for n in latest[0].nodes] == ["b"]


async def check_names(make_registry: RegistryFactory) -> None:
    """Names sharing a prefix stay apart; unusual and long names and node ids round-trip."""
    base = _name()
    names = [base, base + "-mgr", base + ".v2/eu", base + " ünïcödé 日本語 🙂", base + "x" * 200]
    async with make_registry() as registry:
        for i, name in enumerate(names):
            await registry.register(_record(name, f"node:{i}/é"), ttl=30)
        for i, name in enumerate(names):
            assert [n.id for r in await registry.get(name) for n in r.nodes] == [f"node:{i}/é"], name
        await _refuses(lambda: registry.get(base[:-1]), ServiceNotFound, "get() of a prefix of a name")


async def check_watch(make_registry: RegistryFactory) -> None:
    """A watcher sees create, update and delete, with the node that changed."""
    name = _name()
    async with make_registry() as registry:
        async with contextlib.aclosing(registry.watch()) as watcher:
            await registry.register(_record(name), ttl=30)
            created = await _next(watcher, "create", name)
            assert created.service.nodes == [Node(id="n1", address="127.0.0.1:1", metadata={"pid": "1"})]
            assert created.service.endpoints[0].name == "Task.List"
            await registry.register(_record(name, description="changed"), ttl=30)
            updated = await _next(watcher, "update", name)
            assert updated.service.endpoints[0].description == "changed"
            await registry.deregister(_record(name))
            deleted = await _next(watcher, "delete", name)
            assert [n.id for n in deleted.service.nodes] == ["n1"]


async def check_watcher_close(make_registry: RegistryFactory) -> None:
    """A closed watcher ends its iteration; closing it twice is fine."""
    async with make_registry() as registry:
        watcher = registry.watch()
        await watcher.aclose()
        await watcher.aclose()
        with anyio.fail_after(TIMEOUT):
            assert [e async for e in watcher] == []


async def check_ttl(make_registry: RegistryFactory) -> None:
    """A node that is not refreshed expires: watchers hear the delete; the others stay."""
    name = _name()
    async with make_registry() as registry:
        async with contextlib.aclosing(registry.watch()) as watcher:
            await registry.register(_record(name, "short"), ttl=0.5)
            await registry.register(_record(name, "long"), ttl=60)
            event = await _next(watcher, "delete", name, node="short")  # nobody calls get()
            assert [n.id for n in event.service.nodes] == ["short"]
        assert [n.id for r in await registry.get(name) for n in r.nodes] == ["long"]


async def check_bad_input(make_registry: RegistryFactory) -> None:
    """Bad arguments are ``UsageError`` on every backend, before any I/O."""
    name = _name()
    async with make_registry() as registry:
        for ttl in (0, -1, float("nan"), float("inf"), True):
            await _refuses(functools.partial(registry.register, _record(name), ttl=ttl), UsageError, f"ttl={ttl!r}")
        await _refuses(lambda: registry.register({"name": name}, ttl=30),  # type: ignore[arg-type]
                       UsageError, "register(dict)")
        await _refuses(lambda: registry.register(ServiceRecord(""), ttl=30), UsageError, "an empty name")
        await _refuses(lambda: registry.get(""), UsageError, "get('')")
        await _refuses(lambda: registry.get(name), ServiceNotFound, "get() after refused registrations")


CHECKS: dict[str, Callable[[RegistryFactory], Awaitable[None]]] = {
    "lifecycle": check_lifecycle,
    "register_get_list_deregister": check_register_get_list_deregister,
    "not_found": check_not_found,
    "merge": check_merge,
    "names": check_names,
    "watch": check_watch,
    "watcher_close": check_watcher_close,
    "ttl": check_ttl,
    "bad_input": check_bad_input,
}
"""Every check by name, in a sensible order."""


async def check_registry(make_registry: RegistryFactory) -> None:
    """Run every check in :data:`CHECKS` against registries from ``make_registry``."""
    for check in CHECKS.values():
        await check(make_registry)
