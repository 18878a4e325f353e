"""betterproto2 messages as JSON: the dict form, validation of dicts, and JSON Schema.

betterproto2's own ``from_dict`` accepts wrong types silently (``message=5`` for a
string field), so dicts are checked against the message's fields first, with the
failing field's path in the error, the way msgspec reports it for Structs.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import betterproto2
from betterproto2 import Casing, FieldMetadata

from micro.errors import BadRequest

_INTS = {"int32", "uint32", "sint32", "fixed32", "sfixed32"}
_LONGS = {"int64", "uint64", "sint64", "fixed64", "sfixed64"}
_RANGES = {
    "int32": (-(2**31), 2**31 - 1), "sint32": (-(2**31), 2**31 - 1), "sfixed32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1), "fixed32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "sint64": (-(2**63), 2**63 - 1), "sfixed64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1), "fixed64": (0, 2**64 - 1),
}


def enum_names(cls: type) -> list[str]:
    """The proto3 JSON names of an enum's values (``TONE_WARM``, as the .proto spells them)."""
    renamed = getattr(cls, "betterproto_value_to_renamed_proto_names", None)
    if renamed is not None:
        names: dict[int, str] = renamed()
        return [names.get(int(m), m.name) for m in cls]  # type: ignore[attr-defined]
    return [m.name for m in cls]  # type: ignore[attr-defined]
_FLOATS = {"float", "double"}


def to_builtins(message: betterproto2.Message) -> dict[str, Any]:
    """proto3 JSON of a message as a dict, with the .proto's field names and default values."""
    return message.to_dict(casing=Casing.SNAKE, include_default_values=True)


def from_builtins(tp: type[betterproto2.Message], value: dict[str, Any], where: str) -> Any:
    """A message from its dict form, checking every field's type first."""
    try:
        _check(tp, value, "$")
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc.message}") from None
    try:
        return tp.from_dict(value)
    except (KeyError, ValueError, TypeError) as exc:
        raise BadRequest(f"{where}: {exc}") from None


_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_FIXED32_TYPES = {"float", "fixed32", "sfixed32"}
_FIXED64_TYPES = {"double", "fixed64", "sfixed64"}
_LEN_TYPES = {"string", "bytes", "message", "map"}


def check_wire(tp: type[betterproto2.Message], data: bytes, path: str = "$") -> None:
    """Refuse protobuf bytes betterproto2 would parse into nonsense.

    betterproto2's parser does not check lengths (a string that claims 5 bytes and
    has 2 becomes a 2-character string) or wire types (a string field read with
    wire type 3 becomes ``None``). This walks the encoding once, checking every
    length and every known field's wire type, nested messages included.
    """
    meta = _meta(tp)
    by_number: dict[int, str] = meta.field_name_by_number
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i, path)
        number, wire = key >> 3, key & 7
        name = by_number.get(number)
        where = f"{path}.{name}" if name else f"{path} (field {number})"
        if number == 0:
            raise BadRequest(f"malformed protobuf: field number 0 - at `{path}`")
        if wire == _VARINT:
            _, i = _varint(data, i, where)
            start = stop = i
        elif wire == _FIXED64:
            start, stop = i, i + 8
        elif wire == _FIXED32:
            start, stop = i, i + 4
        elif wire == _LEN:
            length, start = _varint(data, i, where)
            stop = start + length
        else:
            raise BadRequest(f"malformed protobuf: wire type {wire} - at `{where}`")
        if stop > end:
            raise BadRequest(f"malformed protobuf: truncated - at `{where}`")
        i = stop
        if name is None:
            continue  # unknown fields are kept as they are
        field = meta.meta_by_field_name[name]
        proto_type = field.proto_type
        if wire == _LEN:
            if proto_type in ("message", "map") and not field.unwrap:
                cls = meta.cls_by_field.get(name)
                if cls is not None and not _is_well_known(cls):
                    check_wire(cls, data[start:stop], where)
                continue
            if proto_type in _LEN_TYPES or field.repeated:  # packed repeated scalars are LEN too
                continue
        elif wire == _VARINT and proto_type not in _LEN_TYPES | _FIXED32_TYPES | _FIXED64_TYPES:
            continue
        elif wire == _FIXED32 and proto_type in _FIXED32_TYPES:
            continue
        elif wire == _FIXED64 and proto_type in _FIXED64_TYPES:
            continue
        raise BadRequest(f"malformed protobuf: wire type {wire} for a {proto_type} - at `{where}`")


def _varint(data: bytes, i: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while i < len(data) and shift < 70:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
    raise BadRequest(f"malformed protobuf: bad varint - at `{where}`")


def _meta(tp: type[betterproto2.Message]) -> Any:
    # ``_betterproto`` is a classproperty that mypy cannot follow through ``type[Message]``
    return getattr(tp, "_betterproto")  # noqa: B009


def _fields(tp: type[betterproto2.Message]) -> dict[str, tuple[dataclasses.Field[Any], FieldMetadata]]:
    out: dict[str, tuple[dataclasses.Field[Any], FieldMetadata]] = {}
    for f in dataclasses.fields(tp):  # type: ignore[arg-type]
        meta = FieldMetadata.get(f)
        out[f.name] = (f, meta)
        out[Casing.CAMEL(f.name)] = (f, meta)
    return out


def _fail(path: str, expected: str, got: object) -> BadRequest:
    return BadRequest(f"Expected `{expected}`, got `{type(got).__name__}` - at `{path}`")


def _check(tp: type[betterproto2.Message], value: dict[str, Any], path: str) -> None:
    fields = _fields(tp)
    classes: dict[str, type] = _meta(tp).cls_by_field
    for key, item in value.items():
        if key not in fields:
            raise BadRequest(f"Object contains unknown field `{key}` - at `{path}`")
        f, meta = fields[key]
        sub = f"{path}.{f.name}"
        if item is None:
            continue
        if meta.proto_type == "map":
            if not isinstance(item, dict):
                raise _fail(sub, "object", item)
            assert meta.map_meta is not None
            for k, v in item.items():
                _check_scalar(meta.map_meta[1].proto_type, v, f"{sub}[{k!r}]",
                              classes.get(f"{f.name}.value"))
        elif meta.repeated:
            if not isinstance(item, list):
                raise _fail(sub, "array", item)
            for i, v in enumerate(item):
                _check_scalar(meta.proto_type, v, f"{sub}[{i}]", classes.get(f.name))
        else:
            _check_scalar(meta.proto_type, item, sub, classes.get(f.name))


def _check_scalar(proto_type: str, v: object, path: str, cls: type | None) -> None:
    if proto_type == "string":
        ok, expected = isinstance(v, str), "str"
    elif proto_type == "bool":
        ok, expected = isinstance(v, bool), "bool"
    elif proto_type in _INTS or proto_type in _LONGS:
        number: object = v
        if proto_type in _LONGS and isinstance(v, str) and v.lstrip("-").isdigit():
            number = int(v)  # proto3 JSON writes 64-bit integers as strings
        ok, expected = isinstance(number, int) and not isinstance(number, bool), "int"
        if ok:
            low, high = _RANGES[proto_type]
            if not low <= number <= high:  # type: ignore[operator]
                raise BadRequest(f"Expected `int` >= {low} and <= {high} ({proto_type}) - at `{path}`")
    elif proto_type in _FLOATS:
        ok = isinstance(v, int | float | str) and not isinstance(v, bool)
        expected = "float"
    elif proto_type == "bytes":
        ok, expected = isinstance(v, str), "str (base64)"
    elif proto_type == "enum":
        ok, expected = isinstance(v, str | int) and not isinstance(v, bool), "str | int"
        if ok and isinstance(v, str) and cls is not None:
            allowed = enum_names(cls)
            if v not in allowed and v not in {m.name for m in cls}:  # type: ignore[attr-defined]
                raise BadRequest(f"Invalid enum value {v!r}, expected one of {allowed} - at `{path}`")
    elif proto_type == "message":
        if cls is not None and issubclass(cls, betterproto2.Message) and isinstance(v, dict):
            if not _is_well_known(cls):
                _check(cls, v, path)
            return
        ok, expected = cls is not None and not issubclass(cls, betterproto2.Message), "object"
    else:
        return
    if not ok:
        raise _fail(path, expected, v)


def _is_well_known(cls: type) -> bool:
    return cls.__module__.startswith("betterproto2.lib")


def schema(tp: type[betterproto2.Message]) -> dict[str, Any]:
    """JSON Schema of a message (nested messages under ``$defs``, referenced by name)."""
    defs: dict[str, Any] = {}
    root = _message_schema(tp, defs)
    if defs:
        root = {**root, "$defs": defs}
    return root


def _message_schema(tp: type[betterproto2.Message], defs: dict[str, Any]) -> dict[str, Any]:
    classes: dict[str, type] = _meta(tp).cls_by_field
    props: dict[str, Any] = {}
    for f in dataclasses.fields(tp):  # type: ignore[arg-type]
        meta = FieldMetadata.get(f)
        if meta.proto_type == "map":
            assert meta.map_meta is not None
            value = _scalar_schema(meta.map_meta[1].proto_type, classes.get(f"{f.name}.value"), defs)
            props[f.name] = {"type": "object", "additionalProperties": value}
        else:
            s = _scalar_schema(meta.proto_type, classes.get(f.name), defs)
            props[f.name] = {"type": "array", "items": s} if meta.repeated else s
    return {"type": "object", "title": tp.__name__, "properties": props}


def _scalar_schema(proto_type: str, cls: type | None, defs: dict[str, Any]) -> dict[str, Any]:
    if proto_type == "string":
        return {"type": "string"}
    if proto_type == "bool":
        return {"type": "boolean"}
    if proto_type in _INTS:
        return {"type": "integer"}
    if proto_type in _LONGS:
        return {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]+$"}]}
    if proto_type in _FLOATS:
        return {"type": "number"}
    if proto_type == "bytes":
        return {"type": "string", "contentEncoding": "base64"}
    if proto_type == "enum" and cls is not None:
        return {"type": "string", "enum": enum_names(cls)}
    if proto_type == "message" and cls is not None and issubclass(cls, betterproto2.Message):
        if _is_well_known(cls):
            return {}
        name = cls.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: recursive messages refer to themselves
            defs[name] = _message_schema(cls, defs)
        return {"$ref": f"#/$defs/{name}"}
    return {}


# -- a measured speed-up for the pinned betterproto2 ------------------------------------------
# betterproto2 0.10 enters ``warnings.catch_warnings()`` for every field default it
# compares against while encoding (to hide DeprecationWarnings of deprecated
# message types), which is most of its encode time. A default that did not warn
# the first time never will, so it is produced directly after that.

_quiet_defaults: set[tuple[type, str]] = set()
_original_default = betterproto2.Message._get_field_default


def _get_field_default(self: betterproto2.Message, field_name: str) -> Any:
    key = (type(self), field_name)
    gen = type(self)._betterproto.default_gen[field_name]  # type: ignore[arg-type]
    if key in _quiet_defaults:
        return gen()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = gen()
    if not caught:
        _quiet_defaults.add(key)
    return value


betterproto2.Message._get_field_default = _get_field_default  # type: ignore[method-assign]
