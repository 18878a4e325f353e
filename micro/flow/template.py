"""Prompt templates rendered from an event, safely.

``"New user: {data}. Welcome {name} ({profile.email})"``: ``{data}`` is the whole
event as JSON, ``{name}`` a top-level field, ``{profile.email}`` a nested one.
Only lookups in the event are possible (no attribute access, no indexing into
Python objects), and a missing field raises :class:`TemplateError` naming it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec


class TemplateError(ValueError):
    """The template needs a field the event does not have, or is malformed."""


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
        return value, field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, dict | list):
            return msgspec.json.encode(value).decode()
        return str(super().format_field(value, format_spec))


def render(template: str, event: Mapping[str, Any]) -> str:
    """The template filled from the event; ``TemplateError`` for a missing field or bad syntax."""
    fields = {"data": dict(event), **event} if "data" not in event else dict(event)
    try:
        return _EventFormatter().vformat(template, (), fields)
    except TemplateError:
        raise
    except (ValueError, IndexError, KeyError) as exc:
        raise TemplateError(f"the prompt template is malformed: {exc}") from None
