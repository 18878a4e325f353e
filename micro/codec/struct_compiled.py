"""Protobuf encoders and decoders compiled per code-first type (msgspec Structs, dataclasses).

The same machinery as :mod:`micro.codec.proto_compiled` (its readers, writers,
error helpers and code namespace), driven by a :class:`~micro.codec.layout.Message`
instead of betterproto2's metadata. Once per type it writes a straight-line
function for each direction:

- the decoder checks what the betterproto2 decoder checks (lengths, truncation,
  wire types of known fields, field number 0, bad varints, invalid UTF-8, enum
  numbers the enum does not have) and builds the *dict form* of the value (what
  its JSON would decode to, with ``bytes`` and ``datetime`` as themselves); the
  codec then converts that with ``msgspec.convert``, so every constraint of the
  type is checked and reported exactly as for JSON (``Expected `int` >= 0 - at
  `$.count```). Unknown fields are skipped (proto3).
- the encoder reads the attributes and writes the bytes protoc-generated code
  would (``tests/test_codec_struct.py`` checks both directions against upb with
  hypothesis, on ``.proto`` files printed by :mod:`micro.codec.proto_file`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import struct
from collections.abc import Callable
from typing import Any

import msgspec

from micro.codec import layout as L
from micro.codec import proto_compiled as pc
from micro.codec.proto import _varint
from micro.errors import BadRequest, Internal

__all__ = ["StructProto", "compile_layout"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_DOUBLE = struct.Struct("<d")
_MISSING = object()
_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class StructProto:
    """The compiled pair of one code-first type."""

    decode: Callable[[bytes, str], dict[str, Any]]  #: ``decode(data, path)``: the dict form, or ``BadRequest``
    encode: Callable[[Any], bytes]  #: ``encode(value)``: its protobuf bytes


# -- run-time helpers the generated code calls ----------------------------------------------


def _sint64(v: int) -> int:
    v &= pc._MASK64
    return v - (1 << 64) if v > 0x7FFFFFFFFFFFFFFF else v


def _range(v: Any, what: str) -> Internal:
    return Internal(f"cannot encode {v!r} as protobuf {what}")


def _text(v: Any) -> str:
    return v if type(v) is str else str(msgspec.to_builtins(v))


def _fields(data: bytes, path: str) -> list[tuple[int, int, Any]]:
    """(number, wire type, value) of each field of a small well-known message: ints and LEN slices."""
    out: list[tuple[int, int, Any]] = []
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i, path)
        number, wire = key >> 3, key & 7
        value: Any
        if number == 0:
            raise pc._bad("field number 0", path)
        if wire == pc._VARINT:
            value, i = _varint(data, i, path)
        elif wire == pc._LEN:
            n, i = _varint(data, i, path)
            if i + n > end:
                raise pc._bad("truncated", path)
            value, i = data[i:i + n], i + n
        elif wire == pc._FIXED64:
            if i + 8 > end:
                raise pc._bad("truncated", path)
            value, i = data[i:i + 8], i + 8
        else:
            i = pc._skip(data, i, end, wire, path)
            continue
        out.append((number, wire, value))
    return out


def _seconds_nanos(data: bytes, path: str) -> tuple[int, int]:
    seconds = nanos = 0
    for number, wire, value in _fields(data, path):
        if wire != pc._VARINT:
            if number in (1, 2):
                raise pc._bad(f"wire type {wire} for an int", path)
            continue
        if number == 1:
            seconds = _sint64(value)
        elif number == 2:
            nanos = value & pc._MASK32
            nanos = nanos - (1 << 32) if nanos > 0x7FFFFFFF else nanos
    return seconds, nanos


def _ts_dec(data: bytes, path: str) -> dt.datetime:
    seconds, nanos = _seconds_nanos(data, path)
    if not 0 <= nanos < 1_000_000_000:
        raise BadRequest(f"Timestamp nanos {nanos} out of range [0, 1e9) - at `{path}`")
    try:
        return _EPOCH + dt.timedelta(seconds=seconds, microseconds=nanos // 1000)
    except OverflowError:
        raise BadRequest(f"Timestamp of {seconds} seconds is out of range - at `{path}`") from None


def _ts_enc(v: dt.datetime) -> bytes:
    if v.tzinfo is None:
        v = v.replace(tzinfo=dt.UTC)  # naive datetimes are taken as UTC
    delta = v - _EPOCH
    return _seconds_nanos_enc(delta.days * 86400 + delta.seconds, delta.microseconds * 1000)


def _dur_dec(data: bytes, path: str) -> dt.timedelta:
    seconds, nanos = _seconds_nanos(data, path)
    try:
        return dt.timedelta(seconds=seconds, microseconds=int(nanos / 1000))
    except OverflowError:
        raise BadRequest(f"Duration of {seconds} seconds is out of range - at `{path}`") from None


def _dur_enc(v: dt.timedelta) -> bytes:
    micros = (v.days * 86400 + v.seconds) * 1_000_000 + v.microseconds
    seconds, rest = divmod(abs(micros), 1_000_000)
    sign = -1 if micros < 0 else 1
    return _seconds_nanos_enc(sign * seconds, sign * rest * 1000)


def _seconds_nanos_enc(seconds: int, nanos: int) -> bytes:
    b = bytearray()
    if seconds:
        b.append(0x08)
        pc._put_varint(b, seconds)
    if nanos:
        b.append(0x10)
        pc._put_varint(b, nanos)
    return bytes(b)


# google.protobuf.Value: null_value = 1, number_value = 2, string_value = 3, bool_value = 4,
# struct_value = 5 (Struct: map<string, Value> fields = 1), list_value = 6 (ListValue: repeated Value values = 1)


def _val_dec(data: bytes, path: str) -> Any:
    value: Any = None
    for number, wire, item in _fields(data, path):
        if number == 1 and wire == pc._VARINT:
            value = None
        elif number == 2 and wire == pc._FIXED64:
            value = _DOUBLE.unpack(item)[0]
            if value.is_integer() and abs(value) < 2**53:
                value = int(value)  # as JSON text would read it back
        elif number == 3 and wire == pc._LEN:
            value = pc._utf8(item, path)
        elif number == 4 and wire == pc._VARINT:
            value = item != 0
        elif number == 5 and wire == pc._LEN:
            value = _struct_dec(item, path)
        elif number == 6 and wire == pc._LEN:
            value = [_val_dec(v, f"{path}[{i}]") for i, v in enumerate(_repeated(item, path))]
        elif number in (1, 2, 3, 4, 5, 6):
            raise pc._bad(f"wire type {wire} for google.protobuf.Value field {number}", path)
    return value


def _repeated(data: bytes, path: str) -> list[bytes]:
    out = []
    for number, wire, item in _fields(data, path):
        if number == 1:
            if wire != pc._LEN:
                raise pc._bad(f"wire type {wire} for a message", path)
            out.append(item)
    return out


def _struct_dec(data: bytes, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in _repeated(data, path):
        key, value = "", None
        for number, wire, item in _fields(entry, path):
            if number == 1 and wire == pc._LEN:
                key = pc._utf8(item, path)
            elif number == 2 and wire == pc._LEN:
                value = item
            elif number in (1, 2):
                raise pc._bad(f"wire type {wire} for a map entry", path)
        out[key] = _val_dec(value, f"{path}.{key}") if value is not None else None
    return out


def _val_enc(v: Any) -> bytes:
    b = bytearray()
    if v is None:
        b += b"\x08\x00"
    elif v is True or v is False:
        b += b"\x20\x01" if v else b"\x20\x00"
    elif isinstance(v, int | float):
        b.append(0x11)
        b += _DOUBLE.pack(float(v))
    elif isinstance(v, str):
        _len(b, 0x1A, v.encode())
    elif isinstance(v, dict):
        _len(b, 0x2A, _struct_enc(v))
    elif isinstance(v, list | tuple):
        inner = bytearray()
        for item in v:
            _len(inner, 0x0A, _val_enc(item))
        _len(b, 0x32, bytes(inner))
    else:
        raise _range(v, "google.protobuf.Value")
    return bytes(b)


def _struct_enc(v: dict[Any, Any]) -> bytes:
    b = bytearray()
    for key, item in v.items():
        entry = bytearray()
        _len(entry, 0x0A, str(key).encode())
        _len(entry, 0x12, _val_enc(item))
        _len(b, 0x0A, bytes(entry))
    return bytes(b)


def _len(b: bytearray, tag: int, payload: bytes) -> None:
    b.append(tag)
    pc._put_varint(b, len(payload))
    b += payload


def _json(v: Any) -> bytes:
    return _val_enc(msgspec.to_builtins(v, str_keys=True))


pc._namespace.update({
    "_sint64": _sint64, "_range": _range, "_text": _text, "_ts_dec": _ts_dec, "_ts_enc": _ts_enc,
    "_dur_dec": _dur_dec, "_dur_enc": _dur_enc, "_val_dec": _val_dec, "_json": _json,
    "_MISSING": _MISSING, "_EPOCH": _EPOCH, "_timedelta": dt.timedelta, "_copysign": math.copysign,
})

# -- the compiler -------------------------------------------------------------------------------

_names: dict[int, str] = {}  # id(Message) -> suffix (layouts are cached for the life of the process)
_keep: list[L.Message] = []
_cache: dict[int, StructProto] = {}


def compile_layout(msg: L.Message) -> StructProto:
    """The compiled codec of a layout (and of every message it reaches), once per layout."""
    found = _cache.get(id(msg))
    if found is not None:
        return found
    with pc._lock:  # one lock for everything compiled into pc._namespace (names, constants, key tables)
        if id(msg) not in _cache:
            todo = [m for m in msg.messages() if id(m) not in _names]
            for m in todo:
                _names[id(m)] = f"{next(pc._serial)}_{pc._NOT_NAME.sub('_', m.name)}"
            sources = []
            for m in todo:
                sources.append(_decoder_source(m) + "\n\n" + _encoder_source(m))
            for m, source in zip(todo, sources, strict=True):
                exec(compile(source, f"<micro.codec.struct_compiled {m.name}>", "exec"), pc._namespace)
                _keep.append(m)
            suffix = _names[id(msg)]
            _cache[id(msg)] = StructProto(pc._namespace[f"_sdec_{suffix}"], pc._namespace[f"_senc_{suffix}"])
    return _cache[id(msg)]


def _wire(f: L.Field) -> int:
    return pc._wire(f.kind) if f.kind in (L.BOOL, L.INT64, L.DOUBLE, L.ENUM) else pc._LEN


# -- decoders --


def _read(f: L.Field, out: str, where: str, indent: str) -> list[str]:
    """Lines reading one value of ``f`` at ``data[i]`` into ``out``, adapted for ``msgspec.convert``."""
    if f.kind in (L.BOOL, L.DOUBLE, L.STRING, L.BYTES):
        return pc._scalar_read(f.kind, out, where, indent)
    if f.kind == L.INT64:
        return pc._scalar_read("int64", out, where, indent)
    if f.kind == L.ENUM:
        assert f.enum is not None
        values = pc._constant({n: m.value for m, n in f.enum.numbers.items()}, "enum")
        lines = pc._scalar_read("int64", out, where, indent)
        lines += [f"{indent}{out} = {values}.get({out}, _MISSING)",
                  f"{indent}if {out} is _MISSING: raise _bad('an enum number {f.enum.name} does not have', {where})"]
        return lines
    lines = pc._scalar_read("bytes", out, where, indent)
    if f.adapt == L.TIMESTAMP:
        lines.append(f"{indent}{out} = _ts_dec({out}, {where})")
    elif f.adapt == L.DURATION:
        lines.append(f"{indent}{out} = _dur_dec({out}, {where})")
    elif f.adapt == L.JSONVALUE:
        lines.append(f"{indent}{out} = _val_dec({out}, {where})")
    else:
        assert f.message is not None
        lines.append(f"{indent}{out} = _sdec_{_names[id(f.message)]}({out}, {where})")
    return lines


def _zero(f: L.Field, where: str) -> str:
    """An expression for the zero value of a singular field."""
    if f.kind == L.ENUM:
        assert f.enum is not None
        zero = next(m for m, n in f.enum.numbers.items() if n == 0)
        return pc._constant(zero.value, "zero")
    if f.kind == L.MESSAGE:
        if f.adapt == L.TIMESTAMP:
            return "_EPOCH"
        if f.adapt == L.DURATION:
            return "_timedelta(0)"
        if f.adapt == L.JSONVALUE:
            return "None"
        assert f.message is not None
        return f"_sdec_{_names[id(f.message)]}(b'', {where})"
    return repr(L._ZERO[f.kind])


def _decoder_source(m: L.Message) -> str:
    suffix = _names[id(m)]
    out: list[str] = []
    for f in m.fields:
        if f.kind == L.MAP:
            out.append(_entry_source(suffix, f))
    known = pc._constant({f.number: (f.name, f.kind) for f in m.fields}, "known")
    lines = [f"def _sdec_{suffix}(data, path):", "    d = {}"]
    for f in m.fields:
        if f.repeated or f.kind == L.MAP:
            lines.append(f"    f_{f.attr} = None")
    lines += ["    i = 0", "    end = len(data)", "    try:", "      while i < end:",
              "        key = data[i]", "        i += 1",
              "        if key > 0x7F: key, i = _varint(data, i - 1, path)"]
    branch = "if"
    for f in m.fields:
        where = f"path + '.{f.name}'"
        if f.kind == L.MAP:
            lines.append(f"        {branch} key == {pc._key(f.number, pc._LEN)}:")
            lines += pc._scalar_read("bytes", "v", where, "            ")
            lines += [f"            if f_{f.attr} is None: f_{f.attr} = {{}}",
                      f"            k, v = _sent_{suffix}_{f.attr}(v, {where})",
                      f"            f_{f.attr}[k] = v"]
        elif f.repeated:
            wire = _wire(f)
            lines.append(f"        {branch} key == {pc._key(f.number, wire)}:")
            lines += _read(f, "v", where, "            ")
            lines += [f"            if f_{f.attr} is None: f_{f.attr} = []", f"            f_{f.attr}.append(v)"]
            if wire != pc._LEN:  # packed
                lines.append(f"        elif key == {pc._key(f.number, pc._LEN)}:")
                lines += pc._scalar_read("bytes", "seg", where, "            ")
                lines += [f"            if f_{f.attr} is None: f_{f.attr} = []"]
                if f.kind == L.DOUBLE:
                    lines.append(f"            f_{f.attr}.extend(_unpack_fixed('d', 8, seg, {where}))")
                else:
                    lines += ["            data_, i_, end_ = data, i, end",
                              "            data, i, end = seg, 0, len(seg)",
                              "            while i < end:"]
                    lines += _read(f, "v", where, "                ")
                    lines += [f"                f_{f.attr}.append(v)", "            data, i, end = data_, i_, end_"]
        else:
            lines.append(f"        {branch} key == {pc._key(f.number, _wire(f))}:")
            lines += _read(f, "v", where, "            ")
            lines.append(f"            d['{f.name}'] = v")
        branch = "elif"
    unknown = [
        "num = key >> 3",
        f"known = {known}.get(num)",
        "where = path + '.' + known[0] if known else path + ' (field ' + str(num) + ')'",
        "if num == 0: raise _bad('field number 0', path)",
        "i = _skip(data, i, end, key & 7, where)",
        "if known: raise _bad('wire type ' + str(key & 7) + ' for a ' + known[1], where)",
    ]
    if m.fields:
        lines.append("        else:")
        lines += ["            " + line for line in unknown]
    else:
        lines += ["        " + line for line in unknown]
    lines += [
        "    except IndexError:",
        f"        known = {known}.get(key >> 3)",
        "        where = path + '.' + known[0] if known else path + ' (field ' + str(key >> 3) + ')'",
        "        raise _bad('bad varint', where) from None",
        "    except UnicodeDecodeError:",
        f"        raise _bad('a string that is not UTF-8', path + '.' + {known}[key >> 3][0]) from None",
    ]
    for f in m.fields:
        if f.repeated or f.kind == L.MAP:
            empty = "{}" if f.kind == L.MAP else "[]"
            if f.required:
                lines.append(f"    d['{f.name}'] = {empty} if f_{f.attr} is None else f_{f.attr}")
            else:
                lines.append(f"    if f_{f.attr} is not None: d['{f.name}'] = f_{f.attr}")
        elif f.required:
            zero = "None" if f.presence else _zero(f, f"path + '.{f.name}'")
            lines.append(f"    if '{f.name}' not in d: d['{f.name}'] = {zero}")
    lines.append("    return d")
    return "\n".join([*out, "\n".join(lines)])


def _entry_source(suffix: str, f: L.Field) -> str:
    assert f.entry is not None
    key, value = f.entry
    lines = [f"def _sent_{suffix}_{f.attr}(data, path):", "    k = _MISSING", "    v = _MISSING",
             "    i = 0", "    end = len(data)", "    while i < end:", "        key = data[i]", "        i += 1",
             "        if key > 0x7F: key, i = _varint(data, i - 1, path)"]
    for name, part in (("k", key), ("v", value)):
        lines.append(f"        {'if' if name == 'k' else 'elif'} key == {pc._key(part.number, _wire(part))}:")
        lines += _read(part, name, "path", "            ")
    lines += ["        else:",
              "            if key >> 3 in (1, 2): raise _bad('wire type ' + str(key & 7) + ' in a map entry', path)",
              "            if key >> 3 == 0: raise _bad('field number 0', path)",
              "            i = _skip(data, i, end, key & 7, path)",
              f"    if k is _MISSING: k = {_zero(key, 'path')}",
              f"    if v is _MISSING: v = {_zero(value, 'path')}",
              "    return k, v"]
    return "\n".join(lines) + "\n\n"


# -- encoders --
# As proto_compiled's: the pieces of a message in a list, joined once; a key with a
# one-byte length or value after it is one piece from that module's tables.


def _write(f: L.Field, v: str, key: int | None) -> list[str]:
    """Lines adding ``key`` (none: no key) and the value ``v`` of ``f`` to the pieces ``p``."""
    if f.kind == L.BOOL:
        if key is None:
            return [f"p.append(b'\\x01' if {v} else b'\\x00')"]
        return [f"p.append({pc._with_byte(key)}[1 if {v} else 0])"]
    if f.kind in (L.INT64, L.ENUM):
        if f.kind == L.ENUM:
            assert f.enum is not None
            numbers = {**f.enum.numbers, **{m.value: n for m, n in f.enum.numbers.items()}}
            lines = [f"x = {pc._constant(numbers, 'numbers')}.get({v})",
                     f"if x is None: raise _range({v}, 'enum {f.enum.name}')"]
        else:
            lines = [f"x = {v}",
                     f"if not {_INT64[0]} <= x <= {_INT64[1]}: raise _range(x, 'int64')"]
        return [*lines, *pc._put_small("x", key)]
    if f.kind == L.DOUBLE:
        if key is None:
            return [f"p.append({pc._constant(_DOUBLE, 'double')}.pack({v}))"]
        tag = pc._key_bytes(key >> 3, key & 7)
        fmt = pc._constant(struct.Struct(f"<{len(tag)}sd"), "double")
        return [f"p.append({fmt}.pack({pc._constant(tag, 'tag')}, {v}))"]
    if f.kind == L.STRING:
        lines = [f"e = {v}.encode()" if f.adapt == L.PLAIN else f"e = _text({v}).encode()"]
    elif f.kind == L.BYTES:
        lines = [f"e = bytes({v})"]
    elif f.adapt == L.TIMESTAMP:
        lines = [f"e = _ts_enc({v})"]
    elif f.adapt == L.DURATION:
        lines = [f"e = _dur_enc({v})"]
    elif f.adapt == L.JSONVALUE:
        lines = [f"e = _json({v})"]
    else:
        assert f.message is not None
        lines = [f"e = _senc_{_names[id(f.message)]}({v})"]
    assert key is not None
    return [*lines, "n = len(e)", *pc._put_small("n", key), "p.append(e)"]


def _indent(lines: list[str], by: int) -> list[str]:
    return [" " * by + line for line in lines]


def _encoder_source(m: L.Message) -> str:
    suffix = _names[id(m)]
    lines = [f"def _senc_{suffix}(m):", "    p = []"]
    for f in m.fields:
        lines.append(f"    v = m.{f.attr}")
        if f.kind == L.MAP:
            assert f.entry is not None
            key, value = f.entry
            lines += ["    if v:", "        outer = p", "        for mk, mv in v.items():", "            p = []"]
            lines += _indent(_write(key, "mk", pc._key(1, _wire(key))), 12)
            lines += _indent(_write(value, "mv", pc._key(2, _wire(value))), 12)
            lines += ["            e = b''.join(p)", "            p = outer", "            n = len(e)"]
            lines += _indent(pc._put_small("n", pc._key(f.number, pc._LEN)), 12)
            lines.append("            p.append(e)")
        elif f.repeated:
            lines.append("    if v:")
            if _wire(f) != pc._LEN:  # packed
                lines += ["        outer = p", "        p = []", "        for item in v:"]
                lines += _indent(_write(f, "item", None), 12)
                lines += ["        e = b''.join(p)", "        p = outer", "        n = len(e)"]
                lines += _indent(pc._put_small("n", pc._key(f.number, pc._LEN)), 8)
                lines.append("        p.append(e)")
            else:
                lines.append("        for item in v:")
                lines += _indent(_write(f, "item", pc._key(f.number, pc._LEN)), 12)
        else:
            if f.presence or f.kind == L.MESSAGE:
                lines.append("    if v is not None:")
            elif f.adapt == L.TEXT:
                lines += ["    v = _text(v)", "    if v:"]
            elif f.kind == L.DOUBLE:
                lines.append("    if v or _copysign(1.0, v) < 0:")  # -0.0 is not the default (upb writes it)
            elif f.kind == L.ENUM:
                assert f.enum is not None
                zero = next(m for m, n in f.enum.numbers.items() if n == 0)
                member, raw = pc._constant(zero, "zero"), pc._constant(zero.value, "zero")
                lines.append(f"    if v is not {member} and v != {raw}:")
            else:
                lines.append("    if v:")
            lines += _indent(_write(f, "v", pc._key(f.number, _wire(f))), 8)
    lines.append("    return b''.join(p)")
    return "\n".join(lines)
