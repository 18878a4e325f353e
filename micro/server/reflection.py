"""gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha``) of a micro server.

grpcurl, Postman and grpcio-reflection's ``ProtoReflectionDescriptorDatabase``
list a port's services and fetch the file descriptors of their messages, so a
client needs no ``.proto`` file. The files served: the derived ``.proto`` of the
code-first endpoints, the descriptors of proto-first endpoints rebuilt from their
betterproto2 classes (:mod:`micro.codec.proto_file`; betterproto2 does not keep the
ones it was generated from), the well-known types they import, and the standard
services' own (health, reflection). A file is sent with the files it imports that
this stream has not sent yet, as grpc-go does.

grpclib has ``grpclib.reflection``, but it reads protobuf's default descriptor
pool, where nothing of a code-first service is, and its messages collide there
with grpcio-reflection's; this one answers from the files it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Stream

from micro.server.standard import FILES, message

__all__ = ["Reflection"]

_VERSIONS = ("v1", "v1alpha")
_MESSAGES = {v: (message(f"grpc.reflection.{v}.ServerReflectionRequest"),
                 message(f"grpc.reflection.{v}.ServerReflectionResponse")) for v in _VERSIONS}


class Reflection:
    """The files and service names of one server, and the reflection services that serve them."""

    def __init__(self) -> None:
        self.services: list[str] = []
        self.files: dict[str, bytes] = {}  # file name -> serialized FileDescriptorProto
        self.deps: dict[str, list[str]] = {}
        self.symbols: dict[str, str] = {}  # full name -> file name
        self.update([], [])

    def __mapping__(self) -> dict[str, Handler]:
        out = {}
        for v in _VERSIONS:
            req, rsp = _MESSAGES[v]
            out[f"/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"] = Handler(
                self._serve(rsp), Cardinality.STREAM_STREAM, req, rsp)
        return out

    def update(self, services: Iterable[str], files: Iterable[bytes]) -> None:
        """Serve these service names and files from now on (the standard services' are always there)."""
        found: dict[str, bytes] = dict(FILES)
        for data in files:
            found[descriptor_pb2.FileDescriptorProto.FromString(data).name] = data
        deps: dict[str, list[str]] = {}
        symbols: dict[str, str] = {}
        for name, data in found.items():
            fdp = descriptor_pb2.FileDescriptorProto.FromString(data)
            deps[name] = list(fdp.dependency)
            prefix = f"{fdp.package}." if fdp.package else ""
            for svc in fdp.service:
                symbols[prefix + svc.name] = name
                for m in svc.method:
                    symbols[f"{prefix}{svc.name}.{m.name}"] = name
            for en in fdp.enum_type:
                symbols[prefix + en.name] = name
            _messages(fdp.message_type, prefix, name, symbols)
        standard = [f"grpc.reflection.{v}.ServerReflection" for v in _VERSIONS] + ["grpc.health.v1.Health"]
        self.files, self.deps, self.symbols = found, deps, symbols
        self.services[:] = sorted({*services, *standard})

    def _serve(self, response: Any) -> Any:
        async def ServerReflectionInfo(stream: Stream[Any, Any]) -> None:
            sent: set[str] = set()
            async for request in stream:
                reply = response(valid_host=request.host, original_request=request)
                which = request.WhichOneof("message_request")
                if which == "list_services":
                    for service in self.services:
                        reply.list_services_response.service.add(name=service)
                elif which in ("file_by_filename", "file_containing_symbol"):
                    key = getattr(request, which)
                    name: str | None = key if which == "file_by_filename" else self.symbols.get(key)
                    if name is None or name not in self.files:
                        reply.error_response.error_code = Status.NOT_FOUND.value
                        reply.error_response.error_message = f"{key!r} not found"
                    else:
                        reply.file_descriptor_response.file_descriptor_proto.extend(self._with_deps(name, sent))
                elif which == "all_extension_numbers_of_type" and request.all_extension_numbers_of_type in self.symbols:
                    reply.all_extension_numbers_response.base_type_name = request.all_extension_numbers_of_type
                else:  # no extensions here
                    reply.error_response.error_code = Status.NOT_FOUND.value
                    reply.error_response.error_message = f"{which or 'an empty request'}: not found"
                await stream.send_message(reply)

        return ServerReflectionInfo

    def _with_deps(self, name: str, sent: set[str]) -> list[bytes]:
        out = [self.files[name]]
        sent.add(name)
        todo = list(self.deps.get(name, []))
        while todo:
            dep = todo.pop(0)
            if dep in sent or dep not in self.files:
                continue
            sent.add(dep)
            out.append(self.files[dep])
            todo += self.deps.get(dep, [])
        return out


def _messages(messages: Iterable[Any], prefix: str, file: str, symbols: dict[str, str]) -> None:
    for msg in messages:
        symbols[prefix + msg.name] = file
        for en in msg.enum_type:
            symbols[f"{prefix}{msg.name}.{en.name}"] = file
        _messages(msg.nested_type, f"{prefix}{msg.name}.", file, symbols)
