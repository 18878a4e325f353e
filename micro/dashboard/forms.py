"""HTML forms from JSON Schemas, and the form's values back as the JSON the schema describes.

The dashboard's try-it form (a service's endpoint) and a waiting flow run's input
form are both made here from the request's JSON Schema in the registry: a field
per top-level property, typed by the property's schema (text, number, checkbox,
a choice for an ``enum``, a JSON text area for objects, arrays and anything else).
:func:`values` reads the submitted form back, converting each field by its type,
and raises :class:`micro.errors.BadRequest` naming the field that does not convert.
The endpoint still validates what it gets: the form only spares a person typing JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from micro.errors import BadRequest

Kind = Literal["string", "integer", "number", "boolean", "enum", "json"]


class Field(msgspec.Struct, frozen=True):
    """One input of a form: its property name, type, whether it is required, its help text and choices."""

    name: str
    kind: Kind
    required: bool = False
    description: str = ""
    choices: tuple[str, ...] = ()
    default: str = ""


def _deref(node: Any, root: Mapping[str, Any]) -> dict[str, Any]:
    for _ in range(32):  # a $ref chain, not a cycle: give up after a few hops
        if not isinstance(node, dict) or "$ref" not in node:
            break
        name = str(node["$ref"]).rpartition("/")[2]
        node = root.get("$defs", {}).get(name, {})
    return node if isinstance(node, dict) else {}


def _kind(node: dict[str, Any], root: Mapping[str, Any]) -> tuple[Kind, tuple[str, ...]]:
    options = node.get("anyOf")
    if isinstance(options, list):  # Optional[X]: X, if the rest is null
        real = [_deref(o, root) for o in options if _deref(o, root).get("type") != "null"]
        if len(real) == 1:
            return _kind(real[0], root)
        return "json", ()
    if "enum" in node and all(isinstance(v, str) for v in node["enum"]):
        return "enum", tuple(node["enum"])
    kind = node.get("type")
    if kind in ("string", "integer", "number", "boolean"):
        return kind, ()
    return "json", ()


def fields(schema: Mapping[str, Any]) -> list[Field]:
    """The form fields of an object schema, in the schema's property order."""
    root = _deref(dict(schema), schema)
    required = set(root.get("required", ()))
    out = []
    for name, prop in (root.get("properties") or {}).items():
        node = _deref(prop, schema)
        kind, choices = _kind(node, schema)
        default = node.get("default", prop.get("default") if isinstance(prop, dict) else None)
        shown = "" if default is None else (default if isinstance(default, str) else
                                            msgspec.json.encode(default).decode())
        if kind == "boolean":
            shown = "true" if default is True else ""
        out.append(Field(name, kind, name in required, str(node.get("description") or prop.get("description") or ""),
                         choices, shown))
    return out


def values(schema: Mapping[str, Any], form: Mapping[str, str], *, where: str) -> dict[str, Any]:
    """The JSON object a submitted form stands for; ``where`` names the form in errors.

    An empty optional field is left out (the endpoint's default applies); an empty
    required one is an error, as is a number that is not one or a JSON field that is
    not JSON.
    """
    data: dict[str, Any] = {}
    for f in fields(schema):
        raw = form.get(f.name, "")
        if f.kind == "boolean":
            data[f.name] = raw in ("true", "on", "1")
            continue
        if raw == "" and f.kind != "string":
            if f.required:
                raise BadRequest(f"{where}: field {f.name!r} is required")
            continue
        if raw == "" and not f.required:
            continue
        data[f.name] = _convert(f, raw, where)
    return data


def _convert(f: Field, raw: str, where: str) -> Any:
    try:
        if f.kind == "integer":
            return int(raw)
        if f.kind == "number":
            return float(raw)
        if f.kind == "json":
            return msgspec.json.decode(raw)
    except (ValueError, msgspec.DecodeError) as exc:
        what = {"integer": "a whole number", "number": "a number", "json": "JSON"}[f.kind]
        raise BadRequest(f"{where}: field {f.name!r} must be {what}, not {raw[:80]!r} ({exc})") from None
    if f.kind == "enum" and raw not in f.choices:
        raise BadRequest(f"{where}: field {f.name!r} must be one of {', '.join(f.choices)}, not {raw[:80]!r}")
    return raw
