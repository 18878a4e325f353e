"""pytest fixtures for micro apps: a MICRO_HOME and a memory runtime per test, a guard against real model calls.

Enable them in your ``conftest.py`` (with pytest-asyncio, ``asyncio_mode = "auto"``)::

    pytest_plugins = ["micro.testing.pytest_plugin"]

Every test then gets its own ``MICRO_HOME`` (a temporary directory; the
:func:`micro_home` fixture, autouse): a service started without a runtime still
joins the loop's shared one, whose machine-wide registry and file store live under
``MICRO_HOME`` — so a test that forgets a runtime never writes under ``~/.micro``.
A test that wants the process's own ``MICRO_HOME`` asks with
``@pytest.mark.micro_home_shared``.

    async def test_task(micro_runtime):
        async with micro.New("task") as svc:       # joins micro_runtime
            svc.handle(Task())
            rsp = await micro_runtime.client.call("task", "Task.List", {})
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from micro.ai import OFFLINE_ENV
from micro.runtime import Runtime
from micro.testing.runtime import runtime

__all__ = ["micro_home", "micro_offline", "micro_runtime", "pytest_configure"]

SHARED_HOME = "micro_home_shared"
"""The marker with which a test keeps the process's ``MICRO_HOME``."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{SHARED_HOME}: keep the process's MICRO_HOME (no per-test one)")


@pytest.fixture(autouse=True)
def micro_home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Path | None]:
    """This test's own ``MICRO_HOME`` (autouse); ``None`` under ``@pytest.mark.micro_home_shared``."""
    if request.node.get_closest_marker(SHARED_HOME) is not None:
        shared = os.environ.get("MICRO_HOME")
        yield Path(shared) if shared else None
        return
    home = tmp_path_factory.mktemp("micro-home")
    monkeypatch.setenv("MICRO_HOME", str(home))
    yield home


@pytest_asyncio.fixture
async def micro_runtime() -> AsyncIterator[Runtime]:
    """An open runtime on memory backends, installed as the loop's shared runtime for the test."""
    async with runtime() as rt:
        yield rt


@pytest.fixture
def micro_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any model request that would leave this machine, and hide the API keys."""
    monkeypatch.setenv(OFFLINE_ENV, "1")
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    yield
