"""Shared test set-up: every test gets its own MICRO_HOME, real servers come from _servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["_servers"]


@pytest.fixture(autouse=True)
def micro_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Isolate the machine-local registry and the file store per test; forbid real model calls."""
    home = tmp_path / "micro-home"
    home.mkdir()
    monkeypatch.setenv("MICRO_HOME", str(home))
    monkeypatch.setenv("MICRO_AI_OFFLINE", "1")  # any model request beyond loopback fails
    # `micro run` in a test serves its dashboard on a free port: tests never take (or wait for) 8080
    monkeypatch.setenv("MICRO_HTTP_ADDRESS", "127.0.0.1:0")
    for var in ("MICRO_REGISTRY", "MICRO_BROKER", "MICRO_STORE", "MICRO_TRANSPORT", "MICRO_LOOP", "MICRO_SOCKET_DIR",
                "ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    yield home


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
