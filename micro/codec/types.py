"""Codecs for the two message kinds: msgspec Structs and betterproto2 messages.

Each codec is built once per type and does four things: ``convert`` any value a
caller may pass (an instance, a dict, JSON text) to an instance of the type,
``decode``/``encode`` bytes for a wire (``"json"`` or ``"proto"``), and
``to_builtins`` — the dict form that callers who ask for no type receive. The
dict form is defined as "what the JSON wire would decode to", so a call returns
the same value whether the service runs in this process or another.
"""

from __future__ import annotations

import abc
import functools
import struct
import sys
from typing import Any, ClassVar

import betterproto2
import msgspec

from micro.codec import proto as _proto
from micro.codec.layout import Message, NotMappable, layout_of
from micro.codec.proto_compiled import Malformed, compiled
from micro.codec.struct_compiled import StructProto, compile_layout
from micro.errors import BadRequest, Error, Internal, UsageError

JSON = "json"
PROTO = "proto"

_encoder = msgspec.json.Encoder()
_any_decoder = msgspec.json.Decoder()


def is_proto_message(tp: object) -> bool:
    """Whether ``tp`` is a betterproto2 message class."""
    return isinstance(tp, type) and issubclass(tp, betterproto2.Message)


def proto_package(tp: type[betterproto2.Message]) -> str:
    """The protobuf package a generated betterproto2 message was registered under."""
    pool = getattr(sys.modules.get(tp.__module__), "default_message_pool", None)
    url: str | None = pool.type_to_url.get(tp) if pool is not None else None
    if url is None:
        raise UsageError(
            f"{tp.__qualname__} is not a generated betterproto2 message (not in its module's "
            "message pool): generate it with `make proto`"
        )
    full = url.rsplit("/", 1)[-1]
    return full.rsplit(".", 1)[0] if "." in full else ""


def encode_json(value: object) -> bytes:
    """JSON for any message kind (proto3 JSON with field names kept for protobuf messages)."""
    if isinstance(value, msgspec.Struct) or type(value) is dict:  # the usual kinds: no ABC check (~0.3 µs)
        return _encoder.encode(value)
    if isinstance(value, betterproto2.Message):
        return _encoder.encode(_proto.to_builtins(value))
    return _encoder.encode(value)


_MALFORMED = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def _malformed(where: str, exc: Exception) -> BadRequest:
    # msgspec raises RecursionError for JSON nested deeper than the stack allows, and
    # UnicodeDecodeError for a string that is not UTF-8: not DecodeError
    if isinstance(exc, RecursionError):
        reason = "nested too deeply"
    elif isinstance(exc, UnicodeDecodeError):
        reason = f"a string is not valid UTF-8 ({exc.reason})"
    else:
        reason = str(exc)
    return BadRequest(f"{where}: malformed JSON: {reason}")


def _as_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class TypeCodec(abc.ABC):
    """Converts, encodes and decodes one request or response type."""

    kind: ClassVar[str]
    wires: tuple[str, ...]

    def __init__(self, tp: type[Any]) -> None:
        self.type = tp

    @abc.abstractmethod
    def convert(self, value: object, where: str) -> Any:
        """An instance of the type from an instance, a dict or JSON; ``BadRequest`` naming the field."""

    @abc.abstractmethod
    def decode(self, data: bytes, wire: str, where: str) -> Any:
        """An instance from wire bytes; ``BadRequest`` naming the field."""

    @abc.abstractmethod
    def encode(self, value: Any, wire: str) -> bytes:
        """Wire bytes of an instance."""

    @abc.abstractmethod
    def to_builtins(self, value: Any) -> Any:
        """The dict form of an instance: what its JSON decodes to."""

    @abc.abstractmethod
    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the type."""

    def from_builtins(self, value: Any, where: str) -> Any:
        """An instance from the dict form (a decoded JSON value)."""
        return self.convert(value, where)


class StructCodec(TypeCodec):
    """msgspec Structs (and any type msgspec can validate): JSON on the wire, and protobuf
    for Structs and dataclasses (the layout of :mod:`micro.codec.layout`)."""

    kind = "struct"

    def __init__(self, tp: type[Any]) -> None:
        super().__init__(tp)
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(tp)
        try:
            self.layout: Message | None = layout_of(tp)
        except NotMappable:
            self.layout = None  # not a Struct or dataclass: JSON only
        self.wires = (JSON,) if self.layout is None else (JSON, PROTO)
        self._proto: StructProto | None = None

    @property
    def proto(self) -> StructProto:
        """The compiled protobuf codec (made on first use: JSON-only callers never pay for it)."""
        if self._proto is None:
            if self.layout is None:
                raise UsageError(f"{self.type!r} has no protobuf form: it is not a msgspec Struct or a dataclass")
            self._proto = compile_layout(self.layout)
        return self._proto

    def convert(self, value: object, where: str) -> Any:
        cls = type(value)
        if cls is self.type:
            return value
        if cls is not dict:  # dicts (the common case) go straight to msgspec.convert
            if isinstance(value, str | bytes | bytearray | memoryview):
                return self.decode(_as_bytes(value), JSON, where)
            if isinstance(value, msgspec.Struct | betterproto2.Message):
                return self.decode(encode_json(value), JSON, where)
        try:
            return msgspec.convert(value, self.type, str_keys=True)  # as JSON would decode
        except msgspec.ValidationError as exc:
            raise BadRequest(f"{where}: {exc}") from None

    def decode(self, data: bytes, wire: str, where: str) -> Any:
        if wire != JSON:
            if self.layout is None:
                raise BadRequest(f"{where}: takes JSON, not {wire} ({self.type!r} has no protobuf form)")
            try:
                value = self.proto.decode(data if type(data) is bytes else bytes(data), "$")
            except BadRequest as exc:
                raise BadRequest(f"{where}: {exc.message}") from None
            except RecursionError:
                raise BadRequest(f"{where}: malformed protobuf: messages nested too deep") from None
            try:
                return msgspec.convert(value, self.type)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"{where}: {exc}") from None
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"{where}: {exc}") from None
        except _MALFORMED as exc:
            raise _malformed(where, exc) from None

    def encode(self, value: Any, wire: str) -> bytes:
        if wire == JSON:
            return _encoder.encode(value)
        try:
            return self.proto.encode(value)
        except Error:
            raise
        except (AttributeError, TypeError, ValueError, OverflowError, struct.error, RecursionError) as exc:
            # a Struct is not validated when it is made: a field may hold a value of another type
            raise Internal(f"cannot encode a {self.type.__name__} as protobuf: {exc!r}") from None

    def to_builtins(self, value: Any) -> Any:
        # str_keys: a dict with int keys must come out as its JSON would decode
        return msgspec.to_builtins(value, str_keys=True)

    def schema(self) -> dict[str, Any]:
        return _inline_root(msgspec.json.schema(self.type))


def _inline_root(schema: dict[str, Any]) -> dict[str, Any]:
    """msgspec puts a Struct's own schema under ``$defs`` behind a root ``$ref``; tool
    schemas (and most readers) want ``{"type": "object", "properties": …}`` at the root."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or set(schema) != {"$ref", "$defs"}:
        return schema
    name = ref.removeprefix("#/$defs/")
    defs: dict[str, Any] = dict(schema["$defs"])
    root = defs.get(name)
    if not isinstance(root, dict):
        return schema
    if f'"{ref}"'.encode() not in _encoder.encode(defs):  # not recursive: no longer needed
        del defs[name]
    return {**root, "$defs": defs} if defs else dict(root)


class ProtoCodec(TypeCodec):
    """betterproto2 messages: protobuf on the wire, proto3 JSON (field names kept) too."""

    kind = "proto"
    wires = (PROTO, JSON)

    def __init__(self, tp: type[betterproto2.Message]) -> None:
        super().__init__(tp)
        self.package = proto_package(tp)
        self._compiled = compiled(tp)  # None: betterproto2 itself, behind check_wire
        self._read = None if self._compiled is None else self._compiled.read

    def convert(self, value: object, where: str) -> Any:
        if type(value) is self.type:
            return value
        if isinstance(value, str | bytes | bytearray | memoryview):
            return self.decode(_as_bytes(value), JSON, where)
        if isinstance(value, msgspec.Struct | betterproto2.Message):
            value = msgspec.json.decode(encode_json(value))
        if not isinstance(value, dict):
            raise BadRequest(f"{where}: expected an object for {self.type.__name__}, got {type(value).__name__}")
        return _proto.from_builtins(self.type, value, where)

    def decode(self, data: bytes, wire: str, where: str) -> Any:
        if wire == PROTO:
            read = self._read
            if read is not None:
                try:
                    return read(data if type(data) is bytes else bytes(data))
                except Malformed as exc:
                    raise BadRequest(f"{where}: {exc.message('$')}") from None
                except RecursionError:
                    raise BadRequest(f"{where}: malformed protobuf: messages nested too deep") from None
            try:
                _proto.check_wire(self.type, data)
            except BadRequest as exc:
                raise BadRequest(f"{where}: {exc.message}") from None
            try:
                return self.type.parse(data)
            except Exception as exc:  # betterproto raises assorted errors on garbage
                raise BadRequest(f"{where}: malformed protobuf for {self.type.__name__}: {exc}") from None
        try:
            value = _any_decoder.decode(data)
        except _MALFORMED as exc:
            raise _malformed(where, exc) from None
        return self.convert(value, where)

    def encode(self, value: Any, wire: str) -> bytes:
        if wire == PROTO:
            if self._compiled is not None and type(value) is self.type:
                return self._compiled.encode(value)
            return bytes(value)
        return _encoder.encode(_proto.to_builtins(value))

    def to_builtins(self, value: Any) -> Any:
        return _proto.to_builtins(value)

    def schema(self) -> dict[str, Any]:
        return _proto.schema(self.type)


@functools.cache
def codec_for(tp: type[Any]) -> TypeCodec:
    """The codec of a request or response type (cached per type)."""
    if is_proto_message(tp):
        return ProtoCodec(tp)
    try:
        msgspec.json.Decoder(tp)
        msgspec.json.schema(tp)
    except (TypeError, ValueError, NameError) as exc:  # NameError: an unresolvable annotation
        raise UsageError(
            f"{tp!r} cannot be a request or response type: use a msgspec.Struct or a "
            f"betterproto2 message ({exc})"
        ) from None
    return StructCodec(tp)
