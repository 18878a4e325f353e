"""``micro run --reload``: edit, save, and the running app picks the change up with no gap.

The watching process imports nothing of the app. It runs the app in a child process
(``micro run PATH --replica``: the same command without ``--reload``) and, on a change
under the app's directory (``.venv``, ``__pycache__``, ``.git`` and the store directory
aside):

1. starts the new version in a fresh child, which reports the nodes it registered on a
   pipe once all of them are serving;
2. waits until the registry shows every one of those nodes (its watch events, the view
   every other process has);
3. only then stops the old child (SIGTERM: deregister, stop accepting, drain in-flight
   calls, close).

A caller that still holds the old node gets "shutting down" or a refused connection,
nothing ran, and the client asks the registry again and reaches the new node. On micro's
native wire (the default between micro processes) the old node keeps each connection open
until its client has closed it, so no request is cut off on its way. Over gRPC
(``MICRO_TRANSPORT=grpc``) a call sent in the instant the old process closes its
connections can be cut off ("dropped the call", it may have run): an idempotent endpoint
retries it, a non-idempotent call fails. A new version that fails to import or start exits
before it is ready; its error (one line and the app's own frames) is printed and the old
version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import anyio
import msgspec
from rich.markup import escape

from micro.cli.main import cli_runtime, err, out

READY_FD = "MICRO_RUN_READY_FD"  # the child writes {"pid", "nodes": [[service, node id], ...]} here once serving
SWAPPED = "MICRO_RUN_SWAPPED"  # "1": a version swapped in for another, which prints no banner
DEBOUNCE_MS = 300  # changes within this are one reload (an editor's save is often several writes)


class Ready(msgspec.Struct):
    """What a child reports once every service it defines is registered and serving."""

    pid: int
    nodes: list[tuple[str, str]]


def child_output() -> tuple[bool, bool]:
    """In ``micro run``: whether it runs under ``--reload`` (the watching process says "stopped", once), and
    whether it prints its banner (not a version swapped in for another: the watcher prints one line).

    The swap mark is taken out of the environment once read (the app's own subprocesses do not see it),
    and means nothing to a process that is not a child of ``--reload``."""
    child = READY_FD in os.environ
    swapped = os.environ.pop(SWAPPED, None) == "1"
    return child, not (child and swapped)


def report_ready(services: list[Any]) -> None:
    """In a child of ``--reload``: tell the parent which nodes now serve (no-op otherwise)."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    nodes = [(s.name, s.record.nodes[0].id) for s in services]
    with os.fdopen(int(fd), "wb") as pipe:
        pipe.write(msgspec.json.encode(Ready(os.getpid(), nodes)) + b"\n")


class Child:
    """One version of the app, in its own ``micro run`` process."""

    def __init__(self, proc: asyncio.subprocess.Process, ready: Ready) -> None:
        self.proc, self.ready = proc, ready

    async def stop(self, grace: float) -> None:
        """SIGTERM (deregister, drain, close), then SIGKILL after ``grace`` seconds."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace, shield=True) as scope:
                await self.proc.wait()
            if scope.cancelled_caught:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


def _read_line(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.readline()


async def start(path: Path, args: list[str], *, replica: bool = True, swapped: bool = True) -> Child | None:
    """Start the app in a child; the child once it serves, or None when it exited first (its error printed).

    A new version runs beside the old one on purpose (``--replica``); the first one warns, as ``micro run``
    does, when another process already serves the app, unless ``replica``. Only the first one (not
    ``swapped``) prints its banner.
    """
    r, w = os.pipe()
    env = {**os.environ, READY_FD: str(w)}
    env.pop(SWAPPED, None)  # only this process says which version is swapped in (not its own environment)
    if swapped:
        env[SWAPPED] = "1"
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "micro.cli", "run", str(path), *(["--replica"] if replica else []), *args,
            env=env, pass_fds=(w,),
        )
    finally:
        os.close(w)  # the child has its own copy: EOF here when it exits without a word
    try:
        line = await anyio.to_thread.run_sync(_read_line, r, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():  # stopping while a version starts: it goes too
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        raise
    if not line:
        await proc.wait()
        return None
    return Child(proc, msgspec.json.decode(line, type=Ready))


async def registered(rt: Any, nodes: list[tuple[str, str]]) -> None:
    """Return once the registry lists every ``(service, node id)``, waiting on its watch events."""
    watcher = rt.registry.watch()
    try:
        missing = set(nodes)

        def seen(records: list[Any]) -> None:
            for rec in records:
                missing.difference_update((rec.name, n.id) for n in rec.nodes)

        seen(await rt.registry.list())
        while missing:
            event = await watcher.__anext__()
            seen([event.service])
    finally:
        await watcher.aclose()


def _watched(path: Path) -> tuple[Path, Any]:
    """The directory to watch, and the filter: watchfiles' defaults, and not the store directory."""
    import watchfiles

    from micro.registry.local import default_home

    root = (path if path.is_dir() else path.parent).resolve()
    return root, watchfiles.DefaultFilter(ignore_paths=[str(Path(default_home()).resolve())])


def changed(changes: set[tuple[Any, str]], root: Path) -> list[str]:
    """The files under ``root`` a batch of watch events changed, leaving out any that came and went within
    it (an editor's or sed's temporary file): nothing left means nothing to reload."""
    from watchfiles import Change

    kinds: dict[str, set[Any]] = {}
    for change, p in changes:
        kinds.setdefault(str(PurePath(p).relative_to(root)), set()).add(change)
    transient = {Change.added, Change.deleted}
    return sorted(name for name, seen in kinds.items() if not transient <= seen)


async def _closing(server: Any) -> None:
    """Close ``server`` when the task group it runs in is cancelled (the watching process stops)."""
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await server.aclose()


async def serve_reloading(path: Path, args: list[str], *, grace: float = 15.0, replica: bool = False,
                          http_server: Callable[[Any], Any] | None = None) -> None:
    """Run the app at ``path`` in a child, and swap in a new child on every change (what ``--reload`` does).

    Unless ``replica``, the first version warns when another process already serves the app. With
    ``http_server`` (given this process's runtime, a bound ``micro.cli.gateway.HttpServer`` or None), this
    process serves the dashboard for every version, once the first one is up.
    """
    try:
        import watchfiles
    except ImportError:
        from micro.errors import UsageError

        raise UsageError("micro run --reload needs watchfiles: pip install 'micro[reload]'") from None
    from micro.service.service import stop_on_signals

    root, watch_filter = _watched(path)
    current: Child | None = None
    async with cli_runtime() as rt, anyio.create_task_group() as tg:
        if str(getattr(rt.registry, "url", "")).startswith("memory:"):
            from micro.errors import UsageError

            raise UsageError("micro run --reload needs a registry the app's processes share (MICRO_REGISTRY="
                             "local://, the default, or nats://…): memory:// is one process's own")
        await tg.start(stop_on_signals, tg.cancel_scope)
        try:
            current = await start(path, args, replica=replica, swapped=False)
            if current is not None:
                await registered(rt, current.ready.nodes)
            else:
                err.print("[yellow]micro run --reload:[/yellow] the app did not start; waiting for a change")
            server = http_server(rt) if http_server is not None else None
            if server is not None:
                tg.start_soon(_closing, server)
                out.print(f"{server.what}: {server.url}", markup=False)
                server.start()
            out.print(f"[dim]reloading on changes under {escape(str(root))}[/dim]")
            sys.stdout.flush()
            async for changes in watchfiles.awatch(root, watch_filter=watch_filter, debounce=DEBOUNCE_MS):
                names = changed(changes, root)
                if not names:
                    continue
                new = await start(path, args)
                if new is None:
                    kept = f" (pid {current.proc.pid})" if current is not None else ""
                    err.print(f"[yellow]micro run --reload:[/yellow] the new version did not start; "
                              f"the running one{kept} goes on serving")
                    continue
                await registered(rt, new.ready.nodes)
                old, current = current, new
                if old is not None:
                    await old.stop(grace)
                out.print(f"[green]reloaded[/green] {escape(', '.join(names))} (pid {new.proc.pid})")
                sys.stdout.flush()
        finally:
            if current is not None:
                await current.stop(grace)
    out.print("stopped")
