"""Message kinds and their codecs.

An endpoint's request and response types are either msgspec Structs (code-first,
JSON on the wire) or betterproto2 messages (proto-first, protobuf on the wire and
proto3 JSON as well). :func:`codec_for` gives the :class:`TypeCodec` of a type once,
at ``handle()`` time, so the call path never inspects a type again.
"""

from micro.codec.types import (
    JSON,
    PROTO,
    ProtoCodec,
    StructCodec,
    TypeCodec,
    codec_for,
    encode_json,
    is_proto_message,
    proto_package,
)

__all__ = [
    "JSON",
    "PROTO",
    "ProtoCodec",
    "StructCodec",
    "TypeCodec",
    "codec_for",
    "encode_json",
    "is_proto_message",
    "proto_package",
]
