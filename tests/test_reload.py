"""micro run --reload: real file edits swap the running app with no failed call; a broken edit keeps the old one.

Synchronisation is on registry events (the old node gone, the new one there) and on what the
processes print, never on sleeps. The endpoint is not idempotent, so the client retries nothing
that may have run: every call either reached a node that answered it, or was refused before
anything ran (a closed listener, a node saying it is shutting down) and went to the new node.
That holds on micro's native wire, the default between micro processes (a draining node keeps a
connection open until its client closes it); over gRPC (MICRO_TRANSPORT=grpc), a request sent in
the instant the old process closes its connections can still be cut off (docs: README).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.text import TextReceiveStream

import micro

ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]

APP = '''"""A service whose answer says which version of the file is serving."""

import micro

VERSION = {version}


class Version:
    async def Get(self, req: dict[str, str]) -> dict[str, int]:
        """Which version answers."""
        return {{"version": VERSION}}


svc = micro.New("reloaded")
svc.handle(Version())
'''


def write(path: Path, text: str) -> None:
    """Replace the file at once, as an editor's save does (no half-written file to import)."""
    tmp = path.with_name(f".{path.name}.tmp~")
    tmp.write_text(text)
    os.replace(tmp, path)


class Output:
    """The lines a process prints, as they come."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = anyio.Condition()

    async def pump(self, proc: anyio.abc.Process) -> None:
        assert proc.stdout is not None
        buf = ""
        async for chunk in TextReceiveStream(proc.stdout):
            buf += chunk
            *done, buf = buf.split("\n")
            async with self._changed:
                self.lines.extend(done)
                self._changed.notify_all()

    async def wait_for(self, needle: str, start: int = 0) -> int:
        """The index of the first line from ``start`` on that contains ``needle``."""
        async with self._changed:
            while True:
                for i in range(start, len(self.lines)):
                    if needle in self.lines[i]:
                        return i
                await self._changed.wait()


async def nodes_of(rt: Any, service: str, watcher: AsyncIterator[Any], want: Any) -> list[str]:
    """Wait on registry events until the service's node ids satisfy ``want``; return them."""
    def current(records: list[Any]) -> list[str]:
        return sorted(n.id for r in records if r.name == service for n in r.nodes)

    ids = current(await rt.registry.list())
    while not want(ids):
        event = await watcher.__anext__()
        if event.service.name == service:
            ids = current(await rt.registry.list())
    return ids


async def test_reload_swaps_the_app_with_no_failed_call(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(APP.format(version=1))
    output = Output()
    errors: list[BaseException] = []
    answers: list[int] = []
    seen = {v: anyio.Event() for v in range(1, 6)}
    more: list[int] = []  # set five_more once this many answers came
    five_more = anyio.Event()
    proc = await anyio.open_process([*MICRO, "run", "--reload", str(app)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        with anyio.fail_after(100):
            async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt, \
                    anyio.create_task_group() as tg:
                tg.start_soon(output.pump, proc)
                watcher = rt.registry.watch()
                first = await nodes_of(rt, "reloaded", watcher, lambda ids: len(ids) == 1)

                async def caller() -> None:
                    while True:
                        try:
                            rsp = await rt.client.call("reloaded", "Version.Get", {}, timeout=10)
                        except Exception as exc:
                            errors.append(exc)
                        else:
                            answers.append(rsp["version"])
                            seen[rsp["version"]].set()
                            if more and len(answers) >= more[0]:
                                five_more.set()
                        await anyio.sleep(0.005)  # pacing, so the 2 cores also start the new versions

                tg.start_soon(caller)
                await seen[1].wait()
                await output.wait_for("reloading on changes under")  # the watch is on: a save now is seen
                before = first
                for version in (2, 3, 4):
                    write(app / "app.py", APP.format(version=version))
                    # the old node deregistered and the new one registered: exactly one, not the old one
                    before = await nodes_of(rt, "reloaded", watcher,
                                            lambda ids, old=before: len(ids) == 1 and ids != old)
                    await seen[version].wait()

                mark = len(output.lines)
                write(app / "app.py", "import micro\n\nVERSION = (\n")  # a syntax error
                at = await output.wait_for("the new version did not start", mark)
                report = output.lines[mark:at]
                assert any(line.startswith("error: ") and "SyntaxError" in line for line in report), report
                assert any('app.py", line 3' in line for line in report), report
                assert len(report) <= 8, report  # brief: one line, the app's frames, no click or asyncio
                assert [n.id for r in await rt.registry.get("reloaded") for n in r.nodes] == before
                calls = len(answers)
                more.append(calls + 5)
                await five_more.wait()
                assert set(answers[calls:]) == {4}  # the old version goes on serving

                write(app / "app.py", APP.format(version=5))  # fixed: the next save swaps again
                last = await nodes_of(rt, "reloaded", watcher, lambda ids: len(ids) == 1 and ids != before)
                await seen[5].wait()
                await output.wait_for("reloaded app.py", at)  # the fourth swap's line (printed once the old one left)
                # the watching process serves the dashboard across the swaps: it shows the node now serving
                url = output.lines[await output.wait_for("dashboard: ")].split()[1]
                async with httpx.AsyncClient(timeout=30) as http:
                    page = await http.get(f"{url}/services/reloaded")
                assert page.status_code == 200 and last[0] in page.text and first[0] not in page.text
                await watcher.aclose()
                tg.cancel_scope.cancel()
    finally:
        print("\n".join(output.lines))  # shown when the test fails
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                await proc.wait()
    assert errors == [], errors[:3]
    assert answers[0] == 1 and answers[-1] == 5 and sorted(set(answers)) == [1, 2, 3, 4, 5]
    assert proc.returncode == 0, "\n".join(output.lines)
    # the first version's banner once, then one line per swap
    assert sum("service reloaded on " in line for line in output.lines) == 1, output.lines
    swaps = [line for line in output.lines if line.startswith("reloaded ")]
    assert len(swaps) == 4 and all(line.startswith("reloaded app.py (pid ") for line in swaps), swaps


def test_the_watch_ignores_virtualenvs_caches_and_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from watchfiles import Change

    from micro.cli.reload import _watched

    monkeypatch.setenv("MICRO_HOME", str(tmp_path / ".micro"))
    (tmp_path / "app.py").write_text("")
    root, keep = _watched(tmp_path / "app.py")
    assert root == tmp_path.resolve()
    assert keep(Change.modified, str(root / "app.py")) and keep(Change.added, str(root / "pkg" / "models.py"))
    for ignored in (".venv/lib/x.py", "__pycache__/app.cpython-311.pyc", ".git/index", ".micro/store/x.json"):
        assert not keep(Change.modified, str(root / ignored)), ignored


def test_a_file_that_came_and_went_within_a_batch_is_no_change(tmp_path: Path) -> None:
    from watchfiles import Change

    from micro.cli.reload import changed

    root = tmp_path.resolve()
    sed_tmp, app = str(root / "sedQDt4AY"), str(root / "app.py")
    assert changed({(Change.added, sed_tmp), (Change.modified, sed_tmp), (Change.deleted, sed_tmp),
                    (Change.modified, app)}, root) == ["app.py"]
    assert changed({(Change.added, sed_tmp), (Change.deleted, sed_tmp)}, root) == []  # nothing to reload
    assert changed({(Change.deleted, app), (Change.added, str(root / "pkg" / "new.py"))}, root) == \
        ["app.py", "pkg/new.py"]


def _run(*args: str, cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([*MICRO, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if "Ctrl-C to stop" in line:
            return proc, seen
    proc.wait(20)
    pytest.fail("micro run exited early:\n" + "\n".join(seen))


def test_a_second_run_of_the_same_app_warns_unless_it_is_a_replica(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP.format(version=1))
    procs = []
    try:
        first, banner = _run("app.py", cwd=tmp_path)
        procs.append(first)
        assert not any("warning" in line for line in banner), banner
        address = next(line for line in banner if "service reloaded on " in line).split(" on ")[1].split()[0]
        second, banner = _run("app.py", cwd=tmp_path)
        procs.append(second)
        warning = " ".join(" ".join(banner).split())
        assert f"warning: already served by a running process: reloaded ({address}). This one adds a second node " \
               "of each: calls go round-robin between the two, and each keeps its own in-memory data. Stop the " \
               "other (Ctrl-C in its terminal), or pass --replica to run a replica on purpose without this " \
               "warning." in warning
        third, banner = _run("app.py", "--replica", cwd=tmp_path)
        procs.append(third)
        assert not any("warning" in line for line in banner), banner
        reloading, banner = _run("--reload", "app.py", cwd=tmp_path)  # its first version warns too
        procs.append(reloading)
        assert any("warning: already served by a running process: reloaded (" in line for line in banner), banner
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait(20)
            assert proc.stdout is not None
            proc.stdout.close()


def test_the_swap_mark_is_read_once_and_means_nothing_outside_a_reload_child(monkeypatch: pytest.MonkeyPatch) -> None:
    from micro.cli import reload

    monkeypatch.setenv(reload.SWAPPED, "1")  # left in a shell, or by a watching process's own parent
    monkeypatch.delenv(reload.READY_FD, raising=False)
    assert reload.child_output() == (False, True)  # a plain `micro run` prints its banner
    monkeypatch.setenv(reload.SWAPPED, "1")
    monkeypatch.setenv(reload.READY_FD, "99")
    assert reload.child_output() == (True, False)  # a version swapped in: no banner
    assert reload.SWAPPED not in os.environ  # the app's own subprocesses do not inherit it


async def test_the_first_version_is_not_marked_swapped_whatever_the_watchers_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from micro.cli import reload

    envs: list[dict[str, str]] = []

    class Exited:
        async def wait(self) -> int:
            return 1

    async def spawn(*args: Any, env: dict[str, str], **options: Any) -> Exited:
        envs.append(env)
        return Exited()  # exits without a word: start() reads EOF and returns None

    monkeypatch.setenv(reload.SWAPPED, "1")
    monkeypatch.setattr(reload.asyncio, "create_subprocess_exec", spawn)
    assert await reload.start(tmp_path, [], swapped=False) is None
    assert await reload.start(tmp_path, [], swapped=True) is None
    assert [e.get(reload.SWAPPED) for e in envs] == [None, "1"]
