"""A2A (Agent2Agent, protocol v1.0) for micro, on the official ``a2a-sdk``.

- :mod:`micro.a2a.tasks`: tasks are runs; the mapping between run records and the protocol's
  tasks, messages and Agent Cards.
- :mod:`micro.a2a.client`: :class:`Client`, an A2A client (any A2A agent, micro's or not); an
  agent's ``agents=[…]`` entry that is an ``http(s)://`` URL is a remote agent it asks through it.
- :mod:`micro.gateway.a2a`: the server side, every agent in the registry as an A2A agent
  (``micro a2a``).

They need the ``a2a`` extra (``pip install 'micro[a2a]'``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":  # imported on use: the a2a-sdk is an extra
        from micro.a2a.client import Client

        return Client
    raise AttributeError(f"module 'micro.a2a' has no attribute {name!r}")
