"""Protobuf encoders and decoders compiled per betterproto2 message class.

betterproto2 encodes and parses by walking each message's field metadata at run
time (42 µs to parse a three-record reply that upb parses in 0.4 µs), and its
parser checks neither lengths nor wire types, so micro walked every message a
second time first (:func:`micro.codec.proto.check_wire`). This module writes, once
per message class, a straight-line Python function for each direction: the decoder
checks what ``check_wire`` checks (lengths, truncation, wire types, field number 0,
bad varints, invalid UTF-8) in the same single pass that builds the message, and
the encoder writes exactly the bytes ``bytes(message)`` writes.

The results are betterproto2's own, field for field: the same defaults, the last
value of a repeated scalar field wins, repeated fields accept packed and unpacked
encodings, unknown fields are kept in ``_unknown_fields`` and written back at the
end, a nested message field that appears twice is replaced (not merged), and
integers are masked and sign-extended the way betterproto2 does it.
``tests/test_codec_compiled.py`` checks that against betterproto2 and upb on
generated messages and bytes.

A class is compiled only if every field is one this module knows: the scalar
types, enums, strings, bytes, nested messages, ``repeated`` and ``optional`` of
those, oneof members and maps. Left to betterproto2 (:func:`compiled` returns
``None``): messages with well-known wrapper types (fields betterproto2 unwraps to
``datetime``, ``timedelta`` or ``str | None``), pydantic dataclasses, classes with
their own ``__post_init__`` (generated code adds one to warn about deprecated
messages; decoded objects are built without calling ``__init__``), subclasses that
add fields (betterproto2 reuses their base's cached metadata), and every class that
reaches one of those. A class and the classes it reaches are compiled together or
not at all.
"""

from __future__ import annotations

import dataclasses
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

__all__ = ["CompiledCodec", "compiled"]

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


def _new(cls: type) -> Any:
    return object.__new__(cls)


# -- the compiler -------------------------------------------------------------------------------

_lock = threading.Lock()
_namespace: dict[str, Any] = {
    "_bad": _bad, "_varint": _varint, "_put": _put_varint, "_skip": _skip, "_utf8": _utf8,
    "_unpack_fixed": _unpack_fixed, "_new": _new, "_Struct": struct.Struct, "_M32": _MASK32, "_M64": _MASK64,
    "_Bad": BadRequest,
}
_serial = itertools.count()
_names: dict[type, str] = {}  # compiled class -> its suffix in _namespace (only once its code is there)
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
                _cache[tp] = CompiledCodec(_namespace[f"_dec_{suffix}"], _namespace[f"_enc_{suffix}"])
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


def _fields(tp: type[betterproto2.Message]) -> list[_Field]:
    if not (isinstance(tp, type) and issubclass(tp, betterproto2.Message) and dataclasses.is_dataclass(tp)):
        raise _Unsupported(tp)
    pydantic = getattr(betterproto2, "pydantic", None)  # betterproto2 imports it when it is installed
    if pydantic is not None and pydantic.dataclasses.is_pydantic_dataclass(tp):
        raise _Unsupported(tp)  # betterproto2 validates pydantic messages on every encode/decode
    if tp.__post_init__ is not betterproto2.Message.__post_init__:
        raise _Unsupported(tp)  # e.g. a deprecation warning: decoded objects are built without __init__
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
    return out


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
        source = _decoder_source(suffix, fields, names) + "\n\n" + _encoder_source(suffix, fields, names)
        code.append((tp, suffix, compile(source, f"<micro.codec.proto_compiled {tp.__qualname__}>", "exec")))
    for tp, suffix, unit in code:
        _namespace[f"_cls_{suffix}"] = tp
        exec(unit, _namespace)
    for tp, suffix, _ in code:
        _names[tp] = suffix


def _constant(value: Any, hint: str) -> str:
    """A name in ``_namespace`` bound to ``value`` (a default or a format)."""
    name = f"_k{len(_namespace)}_{hint}"
    _namespace[name] = value
    return name


# -- decoders --


def _scalar_read(kind: str, out: str, where: str, indent: str) -> list[str]:
    """Lines reading one value of a scalar ``kind`` at ``data[i]`` into ``out``."""
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
        if kind == "string":
            lines.append(f"{out} = _utf8(data[i:j], {where})")
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


def _decoder_source(suffix: str, fields: list[_Field], names: dict[type, str]) -> str:
    known = {f.number: (f.name, f.kind) for f in fields}
    known_name = _constant(known, "known")
    lines = [f"def _dec_{suffix}(data, path):"]
    for f in fields:  # the defaults, as betterproto2's __init__ makes them
        if f.kind == "map":
            lines.append(f"    f_{f.name} = {{}}")
        elif f.repeated:
            lines.append(f"    f_{f.name} = []")
        elif f.presence or f.kind == "message":
            lines.append(f"    f_{f.name} = None")
        else:
            lines.append(f"    f_{f.name} = {_constant(f.default, 'default')}")
    lines += [
        "    unk = b''",
        "    i = 0",
        "    end = len(data)",
    ]
    loop = len(lines)
    lines += [
        "    while i < end:",
        "        start = i",
        "        key = data[i]",
        "        i += 1",
        "        if key > 0x7F: key, i = _varint(data, i - 1, path)",
    ]
    branch = "if"
    for f in fields:
        where = f"path + '.{f.name}'"
        kind = f.kind
        if kind == "map":
            assert f.entry is not None and f.cls is not None
            entry = f"_dec_{names[f.cls]}"
            lines.append(f"        {branch} key == {_key(f.number, _LEN)}:")
            lines += _scalar_read("bytes", "v", where, "            ")
            lines.append(f"            e = {entry}(v, {where})")
            lines.append(f"            f_{f.name}[e.key] = e.value")
        elif kind == "message":
            lines.append(f"        {branch} key == {_key(f.number, _LEN)}:")
            lines += _scalar_read("bytes", "v", where, "            ")
            sub = f"_dec_{names[f.cls]}"  # type: ignore[index]
            if f.repeated:
                lines.append(f"            f_{f.name}.append({sub}(v, {where}))")
            else:
                lines.append(f"            f_{f.name} = {sub}(v, {where})")
        else:
            wire = _wire(kind)
            lines.append(f"        {branch} key == {_key(f.number, wire)}:")
            lines += _scalar_read(kind, "v", where, "            ")
            if kind == "enum":
                lines.append(f"            v = {_constant(f.cls, 'enum')}(v)")
            lines.append(f"            f_{f.name}.append(v)" if f.repeated else f"            f_{f.name} = v")
            if f.repeated and wire != _LEN:  # packed: one length-delimited run of values
                lines.append(f"        elif key == {_key(f.number, _LEN)}:")
                lines += _scalar_read("bytes", "seg", where, "            ")
                if kind in _FIXED_FORMATS:
                    size = 4 if kind in _FIXED32_KINDS else 8
                    values = f"_unpack_fixed('{_FIXED_FORMATS[kind]}', {size}, seg, {where})"
                    lines.append(f"            f_{f.name}.extend({values})")
                else:
                    lines += [
                        "            k = 0",
                        "            m = len(seg)",
                        "            while k < m:",
                        "                v = seg[k]",
                        "                k += 1",
                        f"                if v > 0x7F: v, k = _varint(seg, k - 1, {where})",
                    ]
                    lines += ["                " + line for line in _varint_post(kind, "v")]
                    if kind == "enum":
                        lines.append(f"                v = {_constant(f.cls, 'enum')}(v)")
                    lines.append(f"                f_{f.name}.append(v)")
        branch = "elif"
    unknown = [
        "num = key >> 3",
        f"known = {known_name}.get(num)",
        "where = path + '.' + known[0] if known else path + ' (field ' + str(num) + ')'",
        "if num == 0: raise _bad('field number 0', path)",
        "i = _skip(data, i, end, key & 7, where)",
        "if known: raise _bad('wire type ' + str(key & 7) + ' for a ' + known[1], where)",
        "unk += data[start:i]",
    ]
    if fields:
        lines.append("        else:")
        lines += ["            " + line for line in unknown]
    else:
        lines += ["        " + line for line in unknown]
    body = lines[loop:]
    del lines[loop:]
    lines.append("    try:")
    lines += ["    " + line for line in body]
    lines += [  # only a value's first byte is read unchecked: it was missing
        "    except IndexError:",
        f"        known = {known_name}.get(key >> 3)",
        "        where = path + '.' + known[0] if known else path + ' (field ' + str(key >> 3) + ')'",
        "        raise _bad('bad varint', where) from None",
    ]
    values = ", ".join(f"'{f.name}': f_{f.name}" for f in fields)
    lines += [
        f"    o = _new(_cls_{suffix})",
        f"    o.__dict__.update({{{values}}})" if fields else "",
        "    o._unknown_fields = unk",
        "    return o",
    ]
    return "\n".join(lines)


# -- encoders --


def _scalar_write(kind: str, v: str, indent: str, names: dict[type, str], cls: type | None = None) -> list[str]:
    """Lines appending the value ``v`` (no key) of ``kind`` to ``b``; ``e`` holds LEN payloads."""
    if kind in ("sint32", "sint64"):
        lines = [f"_put(b, {v} << 1 if {v} >= 0 else ({v} << 1) ^ -1)"]
    elif kind in _VARINT_KINDS:
        lines = [f"x = {v}", "if 0 <= x < 0x80: b.append(x)", "else: _put(b, x)"]
    elif kind in _FIXED_FORMATS:
        fmt = _constant(struct.Struct("<" + _FIXED_FORMATS[kind]), kind)
        lines = [f"b += {fmt}.pack({v})"]
    else:
        if kind == "string":
            lines = [f"e = {v}.encode('utf-8')"]
        elif kind == "bytes":
            lines = [f"e = {v}"]
        else:  # message
            assert cls is not None
            sub = f"_enc_{names[cls]}"
            target = f"_cls_{names[cls]}"
            lines = [f"e = {sub}({v}) if type({v}) is {target} else bytes({v})"]
        lines += ["n = len(e)", "if n < 0x80: b.append(n)", "else: _put(b, n)", "b += e"]
    return [indent + line for line in lines]


def _encoder_source(suffix: str, fields: list[_Field], names: dict[type, str]) -> str:
    lines = [f"def _enc_{suffix}(m):", "    b = bytearray()"]
    for f in fields:  # in declaration order, as betterproto2 writes them
        lines.append(f"    v = m.{f.name}")
        kind = f.kind
        if f.kind == "map":
            assert f.entry is not None
            key, value = f.entry
            tag = _constant(_key_bytes(f.number, _LEN), "tag")
            tag_k = _constant(_key_bytes(1, _wire(key.kind)), "tag")
            tag_v = _constant(_key_bytes(2, _wire(value.kind)), "tag")
            lines += [
                "    if v is not None and v != {}:",
                "        outer = b",
                "        for mk, mv in v.items():",
                "            b = bytearray()",
                f"            b += {tag_k}",
            ]
            lines += _scalar_write(key.kind, "mk", "            ", names)
            lines.append(f"            b += {tag_v}")
            lines += _scalar_write(value.kind, "mv", "            ", names, value.cls)
            lines += [
                "            entry = b",
                "            b = outer",
                f"            b += {tag}",
                "            _put(b, len(entry))",
                "            b += entry",
            ]
            continue
        if f.repeated:
            lines.append("    if v is not None and v != []:")
            if kind in _SCALARS - {"string", "bytes"}:  # packed
                tag = _constant(_key_bytes(f.number, _LEN), "tag")
                lines += ["        outer = b", "        b = bytearray()", "        for item in v:"]
                lines += _scalar_write(kind, "item", "            ", names)
                lines += ["        packed = b", "        b = outer", f"        b += {tag}",
                          "        _put(b, len(packed))", "        b += packed"]
            else:
                tag = _constant(_key_bytes(f.number, _LEN), "tag")
                lines += ["        for item in v:", f"            b += {tag}"]
                lines += _scalar_write(kind, "item", "            ", names, f.cls)
            continue
        tag = _constant(_key_bytes(f.number, _wire(kind)), "tag")
        if f.presence or kind == "message":
            lines.append("    if v is not None:")
        else:
            lines.append(f"    if v is not None and v != {_constant(f.default, 'default')}:")
        lines.append(f"        b += {tag}")
        lines += _scalar_write(kind, "v", "        ", names, f.cls)
    lines += ["    b += m._unknown_fields", "    return bytes(b)"]
    return "\n".join(lines)
