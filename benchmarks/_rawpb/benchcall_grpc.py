"""Hand-written grpclib stubs for ``benchcall.Task`` over the upb messages of ``benchcall_pb2``.

The same shape grpclib's own protoc plugin emits: a servicer base whose
``__mapping__`` gives grpclib the handler, and a client stub around
``UnaryUnaryMethod``. grpclib's default ``ProtoCodec`` (``SerializeToString`` /
``FromString``) does the encoding on both sides.
"""

from __future__ import annotations

import abc
from typing import Any

import grpclib.const
import grpclib.server
from grpclib.client import Channel, UnaryUnaryMethod

from . import benchcall_pb2 as pb

PATH = "/benchcall.Task/ListOverdue"


class TaskBase(abc.ABC):
    @abc.abstractmethod
    async def ListOverdue(self, stream: grpclib.server.Stream[Any, Any]) -> None: ...

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            PATH: grpclib.const.Handler(
                self.ListOverdue,
                grpclib.const.Cardinality.UNARY_UNARY,
                pb.ListOverdueRequest,
                pb.ListOverdueResponse,
            ),
        }


class TaskStub:
    def __init__(self, channel: Channel) -> None:
        self.ListOverdue: UnaryUnaryMethod[Any, Any] = UnaryUnaryMethod(
            channel, PATH, pb.ListOverdueRequest, pb.ListOverdueResponse,
        )
