"""pytest fixtures for micro apps: a memory runtime per test, and a guard against real model calls.

Enable them in your ``conftest.py`` (with pytest-asyncio, ``asyncio_mode = "auto"``)::

    pytest_plugins = ["micro.testing.pytest_plugin"]

    async def test_task(micro_runtime):
        async with micro.New("task") as svc:       # joins micro_runtime
            svc.handle(Task())
            rsp = await micro_runtime.client.call("task", "Task.List", {})
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from micro.ai import OFFLINE_ENV
from micro.runtime import Runtime
from micro.testing.runtime import runtime

__all__ = ["micro_offline", "micro_runtime"]


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
