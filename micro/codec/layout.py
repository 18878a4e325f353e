"""The protobuf layout of a code-first type: which message, which fields, which numbers.

A msgspec Struct (or a dataclass) request or response type has a protobuf form so
that any gRPC client can call a code-first endpoint. :func:`layout_of` derives it
once per type; :mod:`micro.codec.struct_compiled` compiles its codec and
:mod:`micro.codec.proto_file` prints it as a ``.proto`` file and a descriptor.

Field numbers follow declaration order (1, 2, 3, …) unless pinned with
:func:`field` (``Annotated[str, micro.field(3)]``); unpinned fields take the free
numbers in declaration order, so pin every field before inserting one in the
middle. A running service compares its layouts with those of the other nodes of
its name in the registry and warns, naming the field, when the same field has
another number (see ``docs/production.md``).

The mapping (Python → protobuf):

==============================================  ===========================================
``str``, ``Literal["a", …]``                    ``string``
``UUID``, ``Decimal``, ``date``, ``time``       ``string`` (their JSON text)
``bytes``, ``bytearray``                        ``bytes``
``bool``                                        ``bool``
``int``, ``Literal[1, …]``                      ``int64``
``float``                                       ``double``
``enum.Enum``                                   an ``enum`` (``NAME_MEMBER``; numbers: an
                                                ``IntEnum`` with a 0 member keeps its values,
                                                others count members in order from 0)
``datetime``                                    ``google.protobuf.Timestamp`` (naive = UTC)
``timedelta``                                   ``google.protobuf.Duration``
a Struct or dataclass                           a ``message``
``list[T]``, ``set[T]``, ``tuple[T, ...]``      ``repeated T``
``dict[K, V]`` (K a str, int or bool)           ``map<K, V>``
``T | None``                                    ``optional T`` (for lists and maps: empty and
                                                ``None`` are the same on this wire)
``Any``, other unions, nested lists, …          ``google.protobuf.Value`` holding the value's
                                                JSON form, validated on arrival as JSON is
==============================================  ===========================================

A scalar field whose default is not its zero value (``count: int = 5``) is
``optional`` on the wire, so that 0 and "not sent" stay apart. A field that is
absent from a request takes its default, or its zero value when it has none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import re
import threading
import uuid
from typing import Any

import msgspec
import msgspec.inspect as mi

from micro.errors import UsageError

__all__ = ["Enum", "Field", "Message", "NotMappable", "field", "layout_of"]

_PIN = "micro.proto.number"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NUMBER = 536_870_911
_RESERVED = range(19_000, 20_000)

# scalar kinds of this wire (proto type names)
STRING, BYTES, BOOL, INT64, DOUBLE = "string", "bytes", "bool", "int64", "double"
MESSAGE, ENUM, MAP = "message", "enum", "map"
# how a Python value becomes the wire value (and back, before msgspec.convert)
PLAIN, TEXT, TIMESTAMP, DURATION, JSONVALUE = "plain", "text", "timestamp", "duration", "json"


def field(number: int) -> Any:
    """Pin a field's protobuf number: ``name: Annotated[str, micro.field(3)]``.

    Pinned numbers never move when fields are added, removed or reordered;
    unpinned fields take the free numbers in declaration order.

    Example::

        class Task(msgspec.Struct):
            id: Annotated[str, micro.field(1)]
            title: Annotated[str, micro.field(2)]
    """
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= MAX_NUMBER \
            or number in _RESERVED:
        raise UsageError(f"micro.field({number!r}): a protobuf field number is an int from 1 to {MAX_NUMBER}, "
                         f"not 19000-19999")
    return msgspec.Meta(extra={_PIN: number})


class NotMappable(Exception):
    """The type has no protobuf form: its endpoints speak JSON only."""


@dataclasses.dataclass(eq=False)
class Enum:
    """A protobuf enum made from a Python ``enum.Enum``."""

    name: str
    cls: type[enum.Enum]
    numbers: dict[Any, int]  # member -> number
    values: list[tuple[str, int]]  # (member name in upper snake case, number), zero first


@dataclasses.dataclass(eq=False)
class Field:
    """One field of a message (or the key or value of a map entry)."""

    name: str  # the wire name (the Struct's encode name)
    attr: str  # the Python attribute
    number: int
    kind: str  # STRING, BYTES, BOOL, INT64, DOUBLE, MESSAGE, ENUM or MAP
    adapt: str = PLAIN  # PLAIN, TEXT, TIMESTAMP, DURATION or JSONVALUE
    repeated: bool = False
    presence: bool = False  # proto3 ``optional``
    required: bool = True  # no default: absent means the zero value
    message: Message | None = None
    enum: Enum | None = None
    entry: tuple[Field, Field] | None = None  # a map's key and value

    @property
    def type_name(self) -> str:
        """The type as a ``.proto`` spells it (without ``repeated``/``optional``)."""
        if self.kind == MAP:
            assert self.entry is not None
            return f"map<{self.entry[0].type_name}, {self.entry[1].type_name}>"
        if self.adapt == TIMESTAMP:
            return "google.protobuf.Timestamp"
        if self.adapt == DURATION:
            return "google.protobuf.Duration"
        if self.adapt == JSONVALUE:
            return "google.protobuf.Value"
        if self.message is not None:
            return self.message.name
        if self.enum is not None:
            return self.enum.name
        return self.kind


@dataclasses.dataclass(eq=False)
class Message:
    """A protobuf message made from a Struct or dataclass."""

    name: str
    cls: type
    fields: list[Field] = dataclasses.field(default_factory=list)
    doc: str = ""

    def messages(self) -> list[Message]:
        """This message and every message it reaches, each once, this one first."""
        seen: dict[int, Message] = {}
        todo = [self]
        while todo:
            m = todo.pop(0)
            if id(m) in seen:
                continue
            seen[id(m)] = m
            for f in m.fields:
                for sub in (f, *(f.entry or ())):
                    if sub.message is not None:
                        todo.append(sub.message)
        return list(seen.values())

    def enums(self) -> list[Enum]:
        out: dict[int, Enum] = {}
        for m in self.messages():
            for f in m.fields:
                for sub in (f, *(f.entry or ())):
                    if sub.enum is not None:
                        out.setdefault(id(sub.enum), sub.enum)
        return list(out.values())


_lock = threading.Lock()
_cache: dict[type, Message | NotMappable] = {}


def layout_of(tp: Any) -> Message:
    """The protobuf message of a request or response type (cached per type).

    Raises:
        NotMappable: the type is not a Struct or dataclass, or a field's name is not
            a protobuf identifier; its endpoints then speak JSON only.
        UsageError: the type pins numbers wrongly (twice the same, or a pin on a
            type that is not a field).
    """
    found = _cache.get(tp)
    if found is None:
        with _lock:
            found = _cache.get(tp)
            if found is None:
                try:
                    found = _builder.message(mi.type_info(tp), tp)
                except NotMappable as exc:
                    found = exc
                _cache[tp] = found
    if isinstance(found, NotMappable):
        raise found
    return found


_SCALARS: dict[type, tuple[str, str]] = {
    mi.StrType: (STRING, PLAIN), mi.BytesType: (BYTES, PLAIN), mi.ByteArrayType: (BYTES, PLAIN),
    mi.BoolType: (BOOL, PLAIN), mi.IntType: (INT64, PLAIN), mi.FloatType: (DOUBLE, PLAIN),
    mi.UUIDType: (STRING, TEXT), mi.DecimalType: (STRING, TEXT), mi.DateType: (STRING, TEXT),
    mi.TimeType: (STRING, TEXT), mi.DateTimeType: (MESSAGE, TIMESTAMP), mi.TimeDeltaType: (MESSAGE, DURATION),
}
_LISTS = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)
_ZERO = {STRING: "", BYTES: b"", BOOL: False, INT64: 0, DOUBLE: 0.0}


class _Builder:
    def __init__(self) -> None:
        self.by_cls: dict[type, Message] = {}
        self.enums: dict[type, Enum] = {}

    def message(self, info: mi.Type, tp: Any) -> Message:
        if not isinstance(info, mi.StructType | mi.DataclassType):
            raise NotMappable(f"{tp!r} is not a msgspec Struct or a dataclass")
        if isinstance(info, mi.StructType) and info.array_like:
            raise NotMappable(f"{info.cls.__name__} is array_like")
        cls = info.cls
        known = self.by_cls.get(cls)
        if known is not None:
            return known
        msg = Message(cls.__name__, cls, doc=(cls.__doc__ or "").strip())
        self.by_cls[cls] = msg  # before its fields: a recursive type refers to itself
        try:
            self._fill(msg, info)
        except BaseException:
            del self.by_cls[cls]
            raise
        return msg

    def _fill(self, msg: Message, info: mi.StructType | mi.DataclassType) -> None:
        cls = info.cls
        pinned: dict[int, str] = {}
        for f in info.fields:
            number = _pin(f.type, f"{cls.__name__}.{f.name}")
            if number is not None:
                if number in pinned:
                    raise UsageError(f"{cls.__name__}: fields {pinned[number]!r} and {f.name!r} are both pinned to "
                                     f"micro.field({number}): give each its own number")
                pinned[number] = f.name
        free = (n for n in range(1, MAX_NUMBER) if n not in pinned and n not in _RESERVED)
        tag = info.tag_field if isinstance(info, mi.StructType) else None
        for f in info.fields:
            if f.encode_name == tag:
                continue
            if not _IDENT.match(f.encode_name):
                raise NotMappable(f"{cls.__name__}.{f.name}: {f.encode_name!r} is not a protobuf field name")
            number = _pin(f.type, "") or next(free)
            out = self.field(_strip(f.type), f.encode_name, f.name, number, f"{cls.__name__}.{f.name}")
            out.required = f.required
            if not f.required and out.kind not in (MAP, MESSAGE) and not out.repeated and not out.presence:
                default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
                if not _is_zero(out, default):
                    out.presence = True  # 0 and "not sent" must stay apart
            msg.fields.append(out)

    def field(self, info: mi.Type, name: str, attr: str, number: int, where: str) -> Field:
        optional = False
        if isinstance(info, mi.UnionType):
            rest = [t for t in info.types if not isinstance(t, mi.NoneType)]
            if len(rest) == 1 and len(rest) < len(info.types):
                optional, info = True, _strip(rest[0])
        if isinstance(info, _LISTS):
            item = _strip(info.item_type)
            out = self.single(item, name, attr, number, where)
            if out is not None and out.kind != MAP and not out.repeated:
                out.repeated = True
                return out
        elif isinstance(info, mi.DictType):
            key = self.single(_strip(info.key_type), "key", "key", 1, where)
            value = self.field(_strip(info.value_type), "value", "value", 2, where)
            if key is not None and key.kind in (STRING, INT64, BOOL) and key.adapt == PLAIN \
                    and not value.repeated and value.kind != MAP and not value.presence:
                return Field(name, attr, number, MAP, entry=(key, value))
        else:
            out = self.single(info, name, attr, number, where)
            if out is not None:
                out.presence = optional and out.kind != MESSAGE
                return out
        return Field(name, attr, number, MESSAGE, JSONVALUE, presence=False)

    def single(self, info: mi.Type, name: str, attr: str, number: int, where: str) -> Field | None:
        """A field of one value of ``info``, or ``None`` when only a JSON value can carry it."""
        scalar = _SCALARS.get(type(info))
        if scalar is not None:
            return Field(name, attr, number, scalar[0], scalar[1])
        if isinstance(info, mi.LiteralType):
            kinds = {type(v) for v in info.values}
            if kinds == {str}:
                return Field(name, attr, number, STRING)
            if kinds == {int}:
                return Field(name, attr, number, INT64)
            return None
        if isinstance(info, mi.EnumType):
            return Field(name, attr, number, ENUM, enum=self.enum(info.cls))
        if isinstance(info, mi.StructType | mi.DataclassType):
            try:
                return Field(name, attr, number, MESSAGE, message=self.message(info, info.cls))
            except NotMappable:
                return None
        return None

    def enum(self, cls: type[enum.Enum]) -> Enum:
        known = self.enums.get(cls)
        if known is not None:
            return known
        members = list(cls)
        by_value = issubclass(cls, enum.IntEnum) and any(m.value == 0 for m in members) \
            and all(-(2**31) <= m.value < 2**31 for m in members)
        numbers = {m: (int(m.value) if by_value else i) for i, m in enumerate(members)}
        values = [(_upper_snake(m.name), n) for m, n in numbers.items()]
        values.sort(key=lambda v: v[1] != 0)  # proto3: the zero value first (a stable sort keeps the rest)
        out = Enum(cls.__name__, cls, numbers, values)
        self.enums[cls] = out
        return out


_builder = _Builder()  # one for the process: a type reached from several roots is one Message


def _strip(info: mi.Type) -> mi.Type:
    while isinstance(info, mi.Metadata):
        info = info.type
    return info


def _pin(info: mi.Type, where: str) -> int | None:
    while isinstance(info, mi.Metadata):
        number = (info.extra or {}).get(_PIN)
        if number is not None:
            return int(number)
        info = info.type
    return None


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def _is_zero(f: Field, default: Any) -> bool:
    if default is None:
        return f.kind == MESSAGE  # a message field has presence of its own
    if f.kind == ENUM:
        assert f.enum is not None
        return f.enum.numbers.get(default) == 0
    if f.adapt == TEXT:
        return default == "" if isinstance(default, str) else False
    if f.adapt == PLAIN and f.kind in _ZERO:
        zero = _ZERO[f.kind]
        return type(default) is type(zero) and default == zero if f.kind != DOUBLE else default == 0.0 \
            and not isinstance(default, bool)
    return False


# the Python types the TEXT adaptation covers, for the codec
TEXT_TYPES = (uuid.UUID, decimal.Decimal, dt.date, dt.time)
