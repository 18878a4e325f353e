"""Prompt templates rendered from an event, safely.

``"New user: {data}. Welcome {name} ({profile.email})"``: ``{data}`` is the whole
event as JSON, ``{name}`` a top-level field, ``{profile.email}`` a nested one.
An event that has a top-level ``data`` field of its own (a CloudEvents envelope,
say) keeps it: there ``{data}`` is that field, not the whole event. An event that
is not a JSON object (a list, a string, bytes that are not JSON) is ``{data}``.
Objects and lists are written as JSON; format specs (``{amount:>8}``) apply to
the other values. Only lookups in the event are possible (no attribute access,
no indexing into Python objects), and a missing field, or a value its format
spec does not fit (``{amount:.2f}`` on ``null``), raises :class:`TemplateError`
naming the field.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec


class TemplateError(ValueError):
    """The template needs a field the event does not have, cannot format a value, or is malformed."""


class _Field:
    """A value looked up in the event, with the field it came from (for error messages)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value


class _EventFormatter(string.Formatter):
    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, str]:
        value: Any = kwargs
        for part in field_name.split("."):
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise TemplateError(f"the event has no field {field_name!r}")
        return _Field(field_name, value), field_name

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if isinstance(value, _Field):
            return _Field(value.name, super().convert_field(value.value, conversion))
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> str:
        name = ""
        if isinstance(value, _Field):
            name, value = value.name, value.value
        if isinstance(value, dict | list):
            return msgspec.json.encode(value).decode()
        try:
            return str(super().format_field(value, format_spec))
        except Exception as exc:  # None with a spec, a str with a number's spec, a width too large…
            raise TemplateError(
                f"the event field {name!r} ({_short(value)}) cannot be formatted with "
                f"{{{name}:{format_spec}}}: {exc}; use a spec that fits every value the field can have, "
                f"or plain {{{name}}}") from None


def _short(value: Any) -> str:
    """The value as the event has it (JSON), cut short."""
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def render(template: str, event: Mapping[str, Any]) -> str:
    """The template filled from the event; ``TemplateError`` for a missing field, a value its format
    spec does not fit, or bad syntax. ``{data}`` is the whole event, unless the event has a ``data``
    field of its own."""
    fields = {"data": dict(event), **event} if "data" not in event else dict(event)
    try:
        return _EventFormatter().vformat(template, (), fields)
    except TemplateError:
        raise
    except (ValueError, IndexError, KeyError) as exc:
        raise TemplateError(f"the prompt template is malformed: {exc}") from None
