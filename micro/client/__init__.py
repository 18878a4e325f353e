"""``Client.call / stream / publish``: the in-process fast path or pooled gRPC to a node."""

from micro.client.client import Client
from micro.client.pool import NodePool

__all__ = ["Client", "NodePool"]
