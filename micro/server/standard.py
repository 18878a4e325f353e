"""The messages of the standard gRPC services every micro port serves (health, reflection).

Their ``.proto`` files are in ``proto/grpc/``; ``make proto`` compiles them into
the descriptor set ``micro/_proto/standard.binpb``, which is loaded here into a
private descriptor pool. Not the default pool: ``grpcio-health-checking`` or
``grpcio-reflection`` (or grpclib's copies) in the same process register the same
names there, and a second registration fails.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["FILES", "message"]

_SET = descriptor_pb2.FileDescriptorSet.FromString(
    (resources.files("micro") / "_proto" / "standard.binpb").read_bytes())
_POOL: Any = descriptor_pool.DescriptorPool()
for _file in _SET.file:
    _POOL.Add(_file)

FILES: dict[str, bytes] = {f.name: f.SerializeToString() for f in _SET.file}
"""Serialized file descriptors of the standard services, by file name (reflection serves them)."""


def message(full_name: str) -> Any:
    """The protobuf message class of a standard message, e.g. ``grpc.health.v1.HealthCheckRequest``."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full_name))
