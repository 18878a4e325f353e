"""docs/embedding.md: micro's services, agents and flows inside a Starlette/FastAPI lifespan and an aiohttp
cleanup_ctx (examples/embed), served for real and seen from the registry like any other."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import micro

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    path = ROOT / "examples" / "embed" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"embed_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def registered() -> dict[str, str]:
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        return {r.name: r.metadata.get("type", "service") for r in await rt.registry.list()}


def test_starlette_lifespan_runs_services_agents_and_flows() -> None:
    import anyio
    from starlette.testclient import TestClient

    example = load("starlette_app")
    with TestClient(example.app) as client:  # runs the lifespan: micro starts with the app
        assert anyio.run(registered) == {"onboard": "flow", "task": "service", "task-mgr": "agent"}
        assert client.get("/overdue/alice").json() == {"records": ["Write quarterly report"], "total": 1}
        rsp = client.post("/ask", json={"message": "What is overdue?"}).json()
        assert "What is overdue?" in rsp["reply"]  # the scripted model echoes
    assert anyio.run(registered) == {}  # and stops with it: deregistered


async def test_aiohttp_cleanup_ctx_runs_services_agents_and_flows() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    example = load("aiohttp_app")
    async with TestClient(TestServer(example.make_app())) as client:  # runs cleanup_ctx up to its yield
        assert await registered() == {"onboard": "flow", "task": "service", "task-mgr": "agent"}
        rsp = await client.get("/overdue/alice")
        assert await rsp.json() == {"records": ["Write quarterly report"], "total": 1}
        rsp = await client.post("/ask", json={"message": "What is overdue?"})
        assert "What is overdue?" in (await rsp.json())["reply"]
    assert await registered() == {}


@pytest.fixture(autouse=True)
def _forget_examples() -> None:
    for name in ("embed_starlette_app", "embed_aiohttp_app"):
        sys.modules.pop(name, None)
