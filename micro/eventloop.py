"""The event loop micro runs its programs on: uvloop when it is installed, the stock loop otherwise.

``micro[fast]`` installs uvloop; ``micro run``, every other command and
``Service.run()`` then use it. ``MICRO_LOOP=asyncio`` keeps the stock loop (it is
fully supported: the tests run on it). Code that starts its own loop
(``asyncio.run``, a test runner) is left alone.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from micro.errors import ConfigError

T = TypeVar("T")

__all__ = ["name", "run"]


def name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop :func:`run` would use."""
    chosen = os.environ.get("MICRO_LOOP") or "auto"
    if chosen not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(f"MICRO_LOOP={chosen!r} is not a loop: use auto (uvloop when installed), asyncio or uvloop")
    if chosen == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if chosen == "uvloop":
            raise ConfigError("MICRO_LOOP=uvloop but uvloop is not installed: pip install 'micro[fast]'") from None
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop (uvloop when installed; see the module docstring)."""
    if name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
