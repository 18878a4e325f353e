"""The registry conformance kit on every backend: memory, local (a directory) and nats (a real nats-server)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from micro.registry import Registry
from micro.registry.local import LocalRegistry
from micro.registry.memory import MemoryRegistry
from micro.registry.nats import NatsRegistry
from micro.testing import check_registry
from micro.testing.registry_kit import CHECKS


@pytest.fixture(params=["memory", "local", "nats"])
def make_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Registry]:
    if request.param == "memory":
        return MemoryRegistry
    if request.param == "local":
        return lambda: LocalRegistry(path=tmp_path / "registry", poll_interval=0.02)
    url = request.getfixturevalue("nats_url")
    bucket = f"kit_{uuid.uuid4().hex[:12]}"
    return lambda: NatsRegistry(f"{url}?bucket={bucket}", poll_interval=0.05)


@pytest.mark.parametrize("check", CHECKS)
async def test_registry_kit(make_registry: Callable[[], Registry], check: str) -> None:
    await CHECKS[check](make_registry)


async def test_check_registry_runs_every_check() -> None:
    await check_registry(MemoryRegistry)
