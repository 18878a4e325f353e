"""Protobuf encoders and decoders compiled per betterproto2 message class.

betterproto2 encodes and parses by walking each message's field metadata at run
time (42 µs to parse a three-record reply that upb parses in 0.4 µs), and its
parser checks neither lengths nor wire types, so micro walked every message a
second time first (:func:`micro.codec.proto.check_wire`). This module writes, once
per message class, a straight-line Python function for each direction: the decoder
checks what ``check_wire`` checks (lengths, truncation, wire types, field number 0,
bad varints, invalid UTF-8) in the same single pass that builds the message, and
the encoder writes exactly the bytes ``bytes(message)`` writes.

What keeps the generated code cheap (``python -m benchmarks call``'s
``codec.proto_vs_json`` measures it): a decoder first reads the fields in the order
the class declares them, one comparison of the next key each, and loops over the
keys only for what is left (fields out of order, unknown fields); a nested message
is read in place, between its start and end in the enclosing bytes (never past its
end: ``tests/test_codec_compiled.py`` checks that it reads, and fails, exactly as
it would alone), not from a copy; paths are not
built while the bytes are good (an error carries its path relative to the message
that found it, and each enclosing decoder adds its field on the way out); decoded
objects are made with ``object.__new__`` and plain attribute stores, without
``__init__``. An encoder collects the pieces of a message in a list and joins them
once; a key and a one-byte length or value come from a table as one piece; a nested
message whose fields are all singular scalars is written inline, not by a call.

The results are betterproto2's own, field for field: the same defaults, a singular
scalar field that appears more than once keeps its last value, repeated fields accept packed and unpacked
encodings, unknown fields are kept in ``_unknown_fields`` and written back at the
end, a nested message field that appears twice is replaced (not merged), and
integers are masked and sign-extended the way betterproto2 does it. One rule is
protobuf's (and upb's) rather than betterproto2's: a oneof member read clears the
other members of its group, so the last one read wins (betterproto2's parser keeps
them all, and its ``which_one_of`` then raises).
``tests/test_codec_compiled.py`` checks that against betterproto2 and upb on
generated messages and bytes.

A class is compiled only if every field is one this module knows: the scalar
types, enums, strings, bytes, nested messages, ``repeated`` and ``optional`` of
those, oneof members and maps. Left to betterproto2 (:func:`compiled` returns
``None``): messages with well-known wrapper types (fields betterproto2 unwraps to
``datetime``, ``timedelta`` or ``str | None``), pydantic dataclasses, classes with
their own ``__post_init__`` (generated code adds one to warn about deprecated
messages), ``__init__`` or ``__setattr__`` (decoded objects are built without calling
``__init__`` and filled by plain attribute stores; generated classes have neither),
classes whose fields are slots or properties (decoded objects get their values in ``__dict__``),
subclasses that add fields (betterproto2 reuses their base's cached metadata), and every class that
reaches one of those. A class and the classes it reaches are compiled together or
not at all.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import re
import struct
import threading
from collections.abc import Callable
from typing import Any

import betterproto2
from betterproto2 import FieldMetadata

from micro.codec.proto import _varint  # check_wire's reader: the same bounds and error
from micro.errors import BadRequest

__all__ = ["CompiledCodec", "Malformed", "compiled"]

log = logging.getLogger("micro.codec")
_NOT_NAME = re.compile(r"\W")

Decoder = Callable[[bytes, str], Any]
Encoder = Callable[[Any], bytes]

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1

_VARINT_KINDS = {"enum", "bool", "int32", "int64", "uint32", "uint64", "sint32", "sint64"}
_FIXED_FORMATS = {"float": "f", "fixed32": "I", "sfixed32": "i", "double": "d", "fixed64": "Q", "sfixed64": "q"}
_FIXED32_KINDS = {"float", "fixed32", "sfixed32"}
_SCALARS = _VARINT_KINDS | set(_FIXED_FORMATS) | {"string", "bytes"}


@dataclasses.dataclass(frozen=True, slots=True)
class CompiledCodec:
    """The compiled pair for one message class."""

    decode: Decoder  #: ``decode(data, path)``: the message, or ``BadRequest`` naming the path
    encode: Encoder  #: ``encode(message)``: its protobuf bytes, as ``bytes(message)``
    read: Callable[[bytes], Any]  #: ``read(data)``: the message, or :class:`Malformed` (one call less)


class _Unsupported(Exception):
    """A field this module does not compile."""


# -- run-time helpers the generated code calls ----------------------------------------------


def _bad(what: str, where: str) -> BadRequest:
    return BadRequest(f"malformed protobuf: {what} - at `{where}`")


def _put_varint(out: bytearray, value: int) -> None:
    """Append ``value`` as a varint (negative numbers as ten bytes, like betterproto2)."""
    if value < 0:
        if value < -(1 << 63):
            raise ValueError(
                "Negative value is not representable as a 64-bit integer - unable to encode a varint within 10 bytes."
            )
        value += 1 << 64
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    _put_varint(out, value)
    return bytes(out)


def _skip(data: bytes, i: int, end: int, wire: int, where: str) -> int:
    """The index after a field's value of wire type ``wire`` starting at ``i``."""
    if wire == _VARINT:
        _, i = _varint(data, i, where)
        return i
    if wire == _FIXED64:
        stop = i + 8
    elif wire == _FIXED32:
        stop = i + 4
    elif wire == _LEN:
        length, i = _varint(data, i, where)
        stop = i + length
    else:
        raise _bad(f"wire type {wire}", where)
    if stop > end:
        raise _bad("truncated", where)
    return stop


def _utf8(data: bytes, where: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError:
        raise _bad("a string that is not UTF-8", where) from None


def _unpack_fixed(fmt: str, size: int, data: bytes, where: str) -> list[Any]:
    if len(data) % size:
        raise _bad(f"packed {size}-byte values in {len(data)} bytes", where)
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


class Malformed(Exception):
    """What the generated decoders raise: what is wrong, and where relative to the message being read.

    Each message's decoder prefixes the field it was reading when a nested one
    fails, and :attr:`CompiledCodec.decode` turns the whole into a ``BadRequest``:
    no path is built while the bytes are good.
    """

    def __init__(self, what: str, rel: str) -> None:
        super().__init__(what, rel)
        self.what = what
        self.rel = rel

    def message(self, path: str) -> str:
        """The error's text, for a message at ``path`` (``$``)."""
        return f"malformed protobuf: {self.what} - at `{path}{self.rel}`"


def _read_varint(data: bytes, i: int, end: int, where: str) -> tuple[int, int]:
    """A varint of more than one byte at ``data[i]``, before ``end`` (``check_wire``'s reader, raising
    :class:`Malformed`)."""
    result = shift = 0
    while i < end and shift < 70:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    raise Malformed("bad varint", where)


def _skip_value(data: bytes, i: int, end: int, wire: int, where: str) -> int:
    """:func:`_skip`, raising :class:`Malformed`."""
    if wire == _VARINT:
        _, i = _read_varint(data, i, end, where)
        return i
    if wire == _FIXED64:
        stop = i + 8
    elif wire == _FIXED32:
        stop = i + 4
    elif wire == _LEN:
        length, i = _read_varint(data, i, end, where)
        stop = i + length
    else:
        raise Malformed(f"wire type {wire}", where)
    if stop > end:
        raise Malformed("truncated", where)
    return stop


def _unpack_packed(fmt: str, size: int, data: bytes, where: str) -> list[Any]:
    if len(data) % size:
        raise Malformed(f"packed {size}-byte values in {len(data)} bytes", where)
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


def _where(known: dict[int, tuple[str, str]], key: int) -> str:
    """Where the field of ``key`` is, relative to its message."""
    field = known.get(key >> 3)
    return "." + field[0] if field else f" (field {key >> 3})"


# -- the compiler -------------------------------------------------------------------------------

_lock = threading.Lock()  # compiling into _namespace (micro.codec.struct_compiled compiles under it too)
_namespace: dict[str, Any] = {
    "_bad": _bad, "_varint": _varint, "_skip": _skip, "_unpack_fixed": _unpack_fixed, "_M32": _MASK32,
    "_M64": _MASK64, "_M": Malformed, "_vr": _read_varint, "_skipv": _skip_value, "_unpack": _unpack_packed,
    "_where": _where, "_onew": object.__new__, "_vb": _varint_bytes, "_one": tuple(bytes([n]) for n in range(128)),
}
_serial = itertools.count()
_names: dict[type, str] = {}  # compiled class -> its suffix in _namespace (only once its code is there)
_field_lists: dict[type, list[_Field]] = {}  # compiled class -> its fields
_cache: dict[type, CompiledCodec | None] = {}


def compiled(tp: type[betterproto2.Message]) -> CompiledCodec | None:
    """The compiled codec of ``tp``, or ``None`` when it (or a message it contains) is left to betterproto2.

    Compiled once per class and kept for the life of the process, like
    ``codec_for``'s cache: message classes are expected to be defined once, not
    made per request.
    """
    try:
        return _cache[tp]
    except KeyError:
        pass
    with _lock:
        if tp not in _cache:
            try:
                _compile(tp)
            except Exception as exc:  # _Unsupported, or a class too odd to introspect: betterproto2 serves it
                log.debug("protobuf codec of %r left to betterproto2: %s", tp, exc)
                _cache[tp] = None
            else:
                suffix = _names[tp]
                _cache[tp] = CompiledCodec(_namespace[f"_decode_{suffix}"], _namespace[f"_enc_{suffix}"],
                                           _namespace[f"_read_{suffix}"])
    return _cache[tp]


@dataclasses.dataclass
class _Field:
    name: str
    number: int
    kind: str  # a proto type name, "message" or "map"
    repeated: bool
    presence: bool  # optional or oneof: None by default, and zero values are written
    default: Any  # the constant default for a scalar without presence
    cls: type | None  # enum, message or map-entry class
    entry: tuple[_Field, _Field] | None = None  # map key and value
    rivals: tuple[str, ...] = ()  # the other members of its oneof, cleared when it is read


def _fields(tp: type[betterproto2.Message]) -> list[_Field]:
    if not (isinstance(tp, type) and issubclass(tp, betterproto2.Message) and dataclasses.is_dataclass(tp)):
        raise _Unsupported(tp)
    pydantic = getattr(betterproto2, "pydantic", None)  # betterproto2 imports it when it is installed
    if pydantic is not None and pydantic.dataclasses.is_pydantic_dataclass(tp):
        raise _Unsupported(tp)  # betterproto2 validates pydantic messages on every encode/decode
    if tp.__post_init__ is not betterproto2.Message.__post_init__:
        raise _Unsupported(tp)  # e.g. a deprecation warning: decoded objects are built without __init__
    if not _generated_init(tp) or tp.__setattr__ is not object.__setattr__:
        # decoded objects are built without __init__ and filled by plain stores into their __dict__
        raise _Unsupported(tp)
    for name in [f.name for f in dataclasses.fields(tp)] + ["_unknown_fields"]:
        attr = type(inspect.getattr_static(tp, name, None))
        if hasattr(attr, "__set__") or hasattr(attr, "__delete__"):
            raise _Unsupported(f"{tp.__name__}.{name}")  # slots or a property: decoded objects fill their __dict__
    try:
        meta = getattr(tp, "_betterproto")  # noqa: B009 - a classproperty
    except Exception as exc:  # an annotation that does not resolve, an odd base class
        raise _Unsupported(tp) from exc
    fields = {f.name: f for f in dataclasses.fields(tp)}
    if list(meta.meta_by_field_name) != list(fields):
        # a subclass that adds fields inherits the metadata betterproto2 cached on its base first
        raise _Unsupported(tp)
    out: list[_Field] = []
    for f in fields.values():
        fm: FieldMetadata = FieldMetadata.get(f)
        if fm.unwrap is not None:
            raise _Unsupported(f"{tp.__name__}.{f.name}")
        kind = fm.proto_type
        cls = meta.cls_by_field.get(f.name)
        field = _Field(f.name, fm.number, kind, bool(fm.repeated), bool(fm.optional or fm.group), None, None)
        if kind == "map":
            if fm.repeated or field.presence or cls is None or fm.map_meta is None or fm.map_meta[1].unwrap:
                raise _Unsupported(f"{tp.__name__}.{f.name}")
            key, value = _fields(cls)  # the entry class betterproto2 made
            if key.kind not in _SCALARS or key.repeated or value.repeated or value.kind == "map":
                raise _Unsupported(f"{tp.__name__}.{f.name}")
            field.cls, field.entry = cls, (key, value)
        elif kind == "message":
            if cls is None:
                raise _Unsupported(f"{tp.__name__}.{f.name}")
            field.cls = cls
        elif kind in _SCALARS:
            if kind == "enum":
                if not isinstance(cls, type):
                    raise _Unsupported(f"{tp.__name__}.{f.name}")
                field.cls = cls
            if not fm.repeated and not field.presence:
                assert f.default_factory is not dataclasses.MISSING
                field.default = f.default_factory()
        else:
            raise _Unsupported(f"{tp.__name__}.{f.name}: {kind}")
        out.append(field)
    groups = {f.name: fm.group for f in fields.values() if (fm := FieldMetadata.get(f)).group}
    for field in out:
        if field.name in groups:
            field.rivals = tuple(n for n, g in groups.items() if g == groups[field.name] and n != field.name)
    return out


def _generated_init(tp: type) -> bool:
    """Whether ``tp.__init__`` is the one ``@dataclass`` made (it only stores the fields and calls
    ``__post_init__``), not a class's own."""
    owner = next((c for c in tp.__mro__ if "__init__" in vars(c)), object)
    params = vars(owner).get("__dataclass_params__")
    code = getattr(vars(owner)["__init__"], "__code__", None)
    return params is not None and params.init and code is not None and code.co_filename == "<string>"


def _wire(kind: str) -> int:
    if kind in _VARINT_KINDS:
        return _VARINT
    if kind in _FIXED_FORMATS:
        return _FIXED32 if kind in _FIXED32_KINDS else _FIXED64
    return _LEN


def _key(number: int, wire: int) -> int:
    return number << 3 | wire


def _key_bytes(number: int, wire: int) -> bytes:
    out = bytearray()
    _put_varint(out, _key(number, wire))
    return bytes(out)


def _compile(root: type[betterproto2.Message]) -> None:
    """Compile ``root`` and every message class it reaches that is not compiled yet: all or nothing.

    Every class of the group is introspected before any code is made, so one
    unsupported class anywhere leaves the whole group to betterproto2 and nothing
    half-made behind; code refers to other classes' functions by suffix, and a
    suffix is unique for the life of the process.
    """
    group: dict[type, list[_Field]] = {}
    todo: list[type] = [root]
    while todo:
        tp = todo.pop()
        if tp in _names or tp in group:
            continue
        if tp in _cache:  # compiled() found it unsupported before
            raise _Unsupported(tp)
        fields = _fields(tp)
        group[tp] = fields
        for f in fields:
            if f.kind in ("message", "map"):  # a map's entry class is a message too
                assert f.cls is not None
                todo.append(f.cls)
    names = dict(_names)
    for tp in group:
        names[tp] = f"{next(_serial)}_{_NOT_NAME.sub('_', tp.__name__)}"
    code = []
    for tp, fields in group.items():
        suffix = names[tp]
        source = _decoder_source(suffix, fields, names) + "\n\n" + \
            _encoder_source(suffix, fields, names, {**_field_lists, **group})
        code.append((tp, suffix, compile(source, f"<micro.codec.proto_compiled {tp.__qualname__}>", "exec")))
    for tp, suffix, unit in code:
        _namespace[f"_cls_{suffix}"] = tp
        exec(unit, _namespace)
    for tp, suffix, _ in code:
        _names[tp] = suffix
        _field_lists[tp] = group[tp]


def _constant(value: Any, hint: str) -> str:
    """A name in ``_namespace`` bound to ``value`` (a default or a format)."""
    name = f"_k{next(_serial)}_{hint}"
    _namespace[name] = value
    return name


# -- decoders --
#
# A decoder reads the fields in the order the message declares them first (the
# order betterproto2, protoc's code and this module write them in), one check of
# the next key each, then loops over whatever is left in any order: unknown
# fields, fields out of order, repeated singular fields. Both parts apply each
# field as it comes, so the result is the same as one loop over the keys.


def _scalar_read(kind: str, out: str, where: str, indent: str) -> list[str]:
    """Lines reading one value of a scalar ``kind`` at ``data[i]`` into ``out`` (``where``: the full path,
    raising ``BadRequest``; :mod:`micro.codec.struct_compiled`'s decoders use these, and turn the
    ``UnicodeDecodeError`` of a string that is not UTF-8 into a ``BadRequest`` naming the field)."""
    if kind in _VARINT_KINDS:
        lines = [
            f"{out} = data[i]",
            "i += 1",
            f"if {out} > 0x7F: {out}, i = _varint(data, i - 1, {where})",
        ]
        lines += _varint_post(kind, out)
    elif kind in _FIXED_FORMATS:
        size = 4 if kind in _FIXED32_KINDS else 8
        fmt = _constant(struct.Struct("<" + _FIXED_FORMATS[kind]), kind)
        lines = [
            f"if i + {size} > end: raise _bad('truncated', {where})",
            f"{out} = {fmt}.unpack_from(data, i)[0]",
            f"i += {size}",
        ]
    else:  # string, bytes, message, map entry: length-delimited
        lines = [
            "n = data[i]",
            "i += 1",
            f"if n > 0x7F: n, i = _varint(data, i - 1, {where})",
            "j = i + n",
            f"if j > end: raise _bad('truncated', {where})",
        ]
        if kind == "string":  # not UTF-8: UnicodeDecodeError, for the decoder to name the field
            lines.append(f"{out} = data[i:j].decode()")
        else:
            lines.append(f"{out} = data[i:j]")
        lines.append("i = j")
    return [indent + line for line in lines]


def _varint_post(kind: str, v: str) -> list[str]:
    """betterproto2's post-processing of a raw varint (mask, sign, zig-zag, bool)."""
    if kind == "int32":
        return [f"{v} &= _M32", f"if {v} > 0x7FFFFFFF: {v} -= 0x100000000"]
    if kind in ("int64", "enum"):
        return [f"{v} &= _M64", f"if {v} > 0x7FFFFFFFFFFFFFFF: {v} -= 0x10000000000000000"]
    if kind == "uint32":
        return [f"{v} &= _M32"]
    if kind == "uint64":
        return [f"{v} &= _M64"]
    if kind == "sint32":
        return [f"{v} &= _M32", f"{v} = ({v} >> 1) ^ -({v} & 1)"]
    if kind == "sint64":
        return [f"{v} &= _M64", f"{v} = ({v} >> 1) ^ -({v} & 1)"]
    return [f"{v} = {v} > 0"]  # bool


def _value(kind: str, out: str, where: str, skip: int) -> list[str]:
    """Lines reading one value of ``kind`` into ``out``: the value starts at ``data[i + skip]`` (``skip``: the
    bytes of its key not consumed yet). ``where`` is the field's path relative to the message, as a literal."""
    at = f"i + {skip}" if skip else "i"
    if kind in _VARINT_KINDS:
        return [f"{out} = data[{at}]", f"i += {skip + 1}",
                f"if {out} > 0x7F: {out}, i = _vr(data, i - 1, end, {where})", *_varint_post(kind, out)]
    if kind in _FIXED_FORMATS:
        size = 4 if kind in _FIXED32_KINDS else 8
        fmt = _constant(struct.Struct("<" + _FIXED_FORMATS[kind]), kind)
        return [f"if i + {skip + size} > end: raise _M('truncated', {where})",
                f"{out} = {fmt}.unpack_from(data, {at})[0]", f"i += {skip + size}"]
    # string, bytes, message, map entry: length-delimited. A string that is not UTF-8 raises
    # UnicodeDecodeError, which the decoder turns into an error naming the field of ``key``. A length
    # whose only byte lies past the end (read from the enclosing message) was missing: a bad varint.
    return ["n = data[" + at + "]", f"i += {skip + 1}", f"if n > 0x7F: n, i = _vr(data, i - 1, end, {where})",
            "j = i + n", f"if j > end: raise _M('truncated' if i <= end else 'bad varint', {where})",
            f"{out} = data[i:j].decode()" if kind == "string" else f"{out} = data[i:j]", "i = j"]


def _nested(call: str, out: str, where: str, skip: int) -> list[str]:
    """Lines reading a length-delimited message into ``out`` with ``call`` (in place: ``data[i:j]``),
    prefixing ``where`` to the path of its errors."""
    lines = _value("bytes", out, where, skip)
    assert lines[-2] == f"{out} = data[i:j]"
    return [*lines[:-2], "try:", f"    {out} = {call}(data, i, j)", "except _M as exc:",
            f"    exc.rel = {where} + exc.rel", "    raise", "i = j"]


def _take(f: _Field, skip: int, names: dict[type, str]) -> list[str]:
    """Lines applying one occurrence of ``f`` under its own key (the key's last ``skip`` bytes unread)."""
    where = repr("." + f.name)
    kind = f.kind
    if kind == "map":
        assert f.cls is not None
        return [*_nested(f"_dec_{names[f.cls]}", "v", where, skip), f"f_{f.name}[v.key] = v.value"]
    if kind == "message":
        assert f.cls is not None
        lines = _nested(f"_dec_{names[f.cls]}", "v", where, skip)
    elif kind in ("string", "bytes") and not f.repeated:
        lines = _value(kind, f"f_{f.name}", where, skip)
    else:
        lines = _value(kind, "v", where, skip)
        if kind == "enum":
            lines.append(f"v = {_constant(f.cls, 'enum')}(v)")
    if kind == "message" or kind not in ("string", "bytes") or f.repeated:
        lines.append(f"f_{f.name}.append(v)" if f.repeated else f"f_{f.name} = v")
    return lines + [f"f_{rival} = None" for rival in f.rivals]  # a oneof member read last wins


def _take_packed(f: _Field, skip: int) -> list[str]:
    """Lines applying one packed run of the repeated scalar ``f`` (under its length-delimited key)."""
    where = repr("." + f.name)
    lines = _value("bytes", "seg", where, skip)
    kind = f.kind
    if kind in _FIXED_FORMATS:
        size = 4 if kind in _FIXED32_KINDS else 8
        return [*lines, f"f_{f.name}.extend(_unpack('{_FIXED_FORMATS[kind]}', {size}, seg, {where}))"]
    lines += ["k = 0", "m = len(seg)", "while k < m:", "    v = seg[k]", "    k += 1",
              f"    if v > 0x7F: v, k = _vr(seg, k - 1, m, {where})"]
    lines += ["    " + line for line in _varint_post(kind, "v")]
    if kind == "enum":
        lines.append(f"    v = {_constant(f.cls, 'enum')}(v)")
    lines.append(f"    f_{f.name}.append(v)")
    return lines


def _next_key_is(key: int) -> tuple[str, int]:
    """A test that the key at ``data[i]`` is ``key``, and the key's length in bytes."""
    tag = _key_bytes(key >> 3, key & 7)
    if len(tag) == 1:
        return f"i < end and data[i] == {key}", 1
    return f"data.startswith({tag!r}, i, end)", len(tag)


def _literal(value: Any, hint: str) -> str:
    """``value`` as source: a literal for the plain defaults, else a name in ``_namespace``."""
    if type(value) in (str, bytes, int, bool) or (type(value) is float and value == 0.0 and str(value) == "0.0"):
        return repr(value)
    return _constant(value, hint)


def _indent(lines: list[str], by: int) -> list[str]:
    return [" " * by + line for line in lines]


def _decoder_source(suffix: str, fields: list[_Field], names: dict[type, str]) -> str:
    known = _constant({f.number: (f.name, f.kind) for f in fields}, "known")
    lines = []
    for f in fields:  # the defaults, as betterproto2's __init__ makes them
        if f.kind == "map":
            lines.append(f"    f_{f.name} = {{}}")
        elif f.repeated:
            lines.append(f"    f_{f.name} = []")
        elif f.presence or f.kind == "message":
            lines.append(f"    f_{f.name} = None")
        else:
            lines.append(f"    f_{f.name} = {_literal(f.default, 'default')}")
    lines += ["    unk = b''", "    key = 0", "    try:"]
    body: list[str] = []
    for f in fields:  # in declaration order
        if f.repeated and f.kind in _SCALARS - {"string", "bytes"}:
            key = _key(f.number, _LEN)
            test, size = _next_key_is(key)
            body += [f"if {test}:", f"    key = {key}", *_indent(_take_packed(f, size), 4)]
            continue
        key = _key(f.number, _LEN if f.kind in ("message", "map") else _wire(f.kind))
        test, size = _next_key_is(key)
        loop = "while" if f.repeated or f.kind == "map" else "if"
        body += [f"{loop} {test}:", f"    key = {key}", *_indent(_take(f, size, names), 4)]
    body += [  # what is left, in any order
        "while i < end:",
        "    start = i",
        "    key = data[i]",
        "    i += 1",
        "    if key > 0x7F: key, i = _vr(data, i - 1, end, '')",
    ]
    branch = "if"
    for f in fields:
        if f.kind in ("message", "map"):
            body += [f"    {branch} key == {_key(f.number, _LEN)}:", *_indent(_take(f, 0, names), 8)]
        else:
            wire = _wire(f.kind)
            body += [f"    {branch} key == {_key(f.number, wire)}:", *_indent(_take(f, 0, names), 8)]
            if f.repeated and wire != _LEN:  # packed: one length-delimited run of values
                body += [f"    elif key == {_key(f.number, _LEN)}:", *_indent(_take_packed(f, 0), 8)]
        branch = "elif"
    unknown = [
        "num = key >> 3",
        f"known = {known}.get(num)",
        "where = '.' + known[0] if known else ' (field ' + str(num) + ')'",
        "if num == 0: raise _M('field number 0', '')",
        "i = _skipv(data, i, end, key & 7, where)",
        "if known: raise _M('wire type ' + str(key & 7) + ' for a ' + known[1], where)",
        "unk += data[start:i]",
    ]
    body += [*(["    else:"] if fields else []), *_indent(unknown, 8 if fields else 4)]
    # a varint's first byte is read unchecked: past ``end`` (in the enclosing message) or past the
    # bytes (IndexError), it was missing
    body.append(f"if i > end: raise _M('bad varint', _where({known}, key))")
    lines += _indent(body, 8)
    lines += [
        "    except IndexError:",
        f"        raise _M('bad varint', _where({known}, key)) from None",
        "    except UnicodeDecodeError:",
        f"        raise _M('a string that is not UTF-8', _where({known}, key)) from None",
        f"    o = _onew(_cls_{suffix})",
    ]
    lines += [f"    o.{f.name} = f_{f.name}" for f in fields]  # plain stores: _fields checked
    lines += ["    o._unknown_fields = unk", "    return o"]
    # one body twice: nested messages are read in place, between ``i`` and ``end`` of the enclosing bytes
    return "\n".join([f"def _dec_{suffix}(data, i, end):", *lines, "",
                      f"def _read_{suffix}(data):", "    i = 0", "    end = len(data)", *lines, "",
                      f"def _decode_{suffix}(data, path):",
                      "    try:",
                      f"        return _read_{suffix}(data)",
                      "    except _M as exc:",
                      "        raise _bad(exc.what, path + exc.rel) from None"])


# -- encoders --
# An encoder collects the pieces of a message in a list and joins them once; a key
# with a one-byte length or value after it is one piece from a table.

_tables: dict[int, str] = {}  # key -> the name of its table in _namespace


def _with_byte(key: int) -> str:
    """The name of a tuple of the 128 byte strings ``key`` + one byte 0-127: a key with a small length or
    varint value in one piece."""
    name = _tables.get(key)
    if name is None:
        tag = _key_bytes(key >> 3, key & 7)
        name = _tables[key] = _constant(tuple(tag + bytes([n]) for n in range(128)), f"key{key}")
    return name


def _put_small(value: str, key: int | None, p: str = "p") -> list[str]:
    """Lines adding ``key`` (none: no key) and the integer ``value`` as a varint to the pieces ``p``."""
    small = f"{value} < 0x80" if value == "n" else f"0 <= {value} < 0x80"  # n: a length
    if key is None:
        return [f"{p}.append(_one[{value}] if {small} else _vb({value}))"]
    tag = _constant(_key_bytes(key >> 3, key & 7), "tag")
    return [f"if {small}: {p}.append({_with_byte(key)}[{value}])", "else:", f"    {p}.append({tag})",
            f"    {p}.append(_vb({value}))"]


class _Encoding:
    """What the encoder of a group of classes writes, and which nested messages it writes inline."""

    def __init__(self, names: dict[type, str], fields: dict[type, list[_Field]]) -> None:
        self.names = names
        self.fields = fields

    def flat(self, cls: type | None) -> list[_Field] | None:
        """The fields of ``cls`` if they are all singular scalars (written inline by the encoders of the
        messages that contain it: a call less per nested message), else ``None``."""
        fields = self.fields.get(cls) if cls is not None else None
        if fields is None or any(f.repeated or f.kind not in _SCALARS for f in fields):
            return None
        return fields

    def write(self, kind: str, v: str, key: int | None, cls: type | None = None, p: str = "p") -> list[str]:
        """Lines adding ``key`` (none: no key) and the value ``v`` of ``kind`` to the pieces ``p``."""
        if kind in ("sint32", "sint64"):
            return [f"x = {v} << 1 if {v} >= 0 else ({v} << 1) ^ -1", *_put_small("x", key, p)]
        if kind in _VARINT_KINDS:
            return _put_small(v, key, p)
        if kind in _FIXED_FORMATS:
            if key is None:
                return [f"{p}.append({_constant(struct.Struct('<' + _FIXED_FORMATS[kind]), kind)}.pack({v}))"]
            tag = _key_bytes(key >> 3, key & 7)
            fmt = _constant(struct.Struct(f"<{len(tag)}s{_FIXED_FORMATS[kind]}"), kind)
            return [f"{p}.append({fmt}.pack({_constant(tag, 'tag')}, {v}))"]
        if kind == "string":
            lines = [f"e = {v}.encode()"]
        elif kind == "bytes":
            lines = [f"e = {v}"]
        else:  # a message, as itself when it is exactly its class (not a subclass that may encode otherwise)
            assert cls is not None
            flat = self.flat(cls)
            if flat is None:
                lines = [f"e = _enc_{self.names[cls]}({v}) if type({v}) is _cls_{self.names[cls]} else bytes({v})"]
            else:
                lines = [f"if type({v}) is _cls_{self.names[cls]}:", "    q = []"]
                for f in flat:
                    lines += _indent(self.singular(f, v, "w", "q"), 4)
                lines += [f"    q.append({v}._unknown_fields)", "    e = b''.join(q)", f"else: e = bytes({v})"]
        assert key is not None
        return [*lines, "n = len(e)", *_put_small("n", key, p), f"{p}.append(e)"]

    def singular(self, f: _Field, m: str, v: str, p: str) -> list[str]:
        """Lines adding the singular field ``f`` of the message ``m`` to the pieces ``p`` (``v``: its value)."""
        if f.presence or f.kind == "message":
            test = f"{v} is not None"
        else:
            test = f"{v} is not None and {v} != {_literal(f.default, 'default')}"
        key = _key(f.number, _LEN if f.kind == "message" else _wire(f.kind))
        return [f"{v} = {m}.{f.name}", f"if {test}:", *_indent(self.write(f.kind, v, key, f.cls, p), 4)]


def _encoder_source(suffix: str, fields: list[_Field], names: dict[type, str],
                    field_lists: dict[type, list[_Field]]) -> str:
    enc = _Encoding(names, field_lists)
    lines = [f"def _enc_{suffix}(m):", "    p = []"]
    for f in fields:  # in declaration order, as betterproto2 writes them
        kind = f.kind
        if not f.repeated and kind != "map":
            lines += _indent(enc.singular(f, "m", "v", "p"), 4)
            continue
        lines.append(f"    v = m.{f.name}")
        if kind == "map":
            assert f.entry is not None
            key, value = f.entry
            lines += ["    if v is not None and v != {}:", "        outer = p", "        for mk, mv in v.items():",
                      "            p = []"]
            lines += _indent(enc.write(key.kind, "mk", _key(1, _wire(key.kind))), 12)
            lines += _indent(enc.write(value.kind, "mv", _key(2, _wire(value.kind)), value.cls), 12)
            lines += ["            e = b''.join(p)", "            p = outer", "            n = len(e)"]
            lines += _indent(_put_small("n", _key(f.number, _LEN)), 12)
            lines.append("            p.append(e)")
        elif f.repeated and kind in _SCALARS - {"string", "bytes"}:  # packed
            lines += ["    if v is not None and v != []:", "        outer = p", "        p = []",
                      "        for item in v:"]
            lines += _indent(enc.write(kind, "item", None), 12)
            lines += ["        e = b''.join(p)", "        p = outer", "        n = len(e)"]
            lines += _indent(_put_small("n", _key(f.number, _LEN)), 8)
            lines.append("        p.append(e)")
        else:
            lines += ["    if v is not None and v != []:", "        for item in v:"]
            lines += _indent(enc.write(kind, "item", _key(f.number, _LEN), f.cls), 12)
    lines += ["    p.append(m._unknown_fields)", "    return b''.join(p)"]
    return "\n".join(lines)

