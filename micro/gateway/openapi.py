"""The OpenAPI 3.1 document of the HTTP gateway, built from the registry's JSON Schemas.

Every endpoint of every service is one ``POST /api/{service}/{Handler.Method}``
operation (tagged with its service, described by its docstring). The request and
response schemas are the ones in the registry record; their ``$defs`` are hoisted
into ``components/schemas`` as ``{service}.{Name}`` (a name two different shapes
share gets ``_2``, ``_3``…) and the ``#/$defs/…`` references rewritten to point
there, because in an OpenAPI document ``#`` is the document, not the schema.
A streaming endpoint answers ``text/event-stream``; the schema of one event's
``data:`` is under ``x-micro-item-schema``.

Example::

    doc = document(await runtime.registry.list())
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from micro.gateway import micro_version
from micro.registry import Endpoint, ServiceRecord

__all__ = ["OPENAPI_VERSION", "document"]

OPENAPI_VERSION = "3.1.0"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DEFS = "#/$defs/"
_COMPONENTS = "#/components/schemas/"

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "the gRPC status name, e.g. INVALID_ARGUMENT"},
                "message": {"type": "string", "description": "what failed, where, and what to do about it"},
            },
            "required": ["code", "message"],
        },
    },
    "required": ["error"],
}


class _Schemas:
    """``components/schemas``, filled schema by schema with ``$defs`` hoisted."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def _free(self, base: str, taken: set[str]) -> str:
        name, n = base, 2
        while name in self.schemas or name in taken:
            name, n = f"{base}_{n}", n + 1
        return name

    def add(self, prefix: str, schema: dict[str, Any], fallback: str) -> dict[str, Any]:
        """The schema to use in an operation: a ``$ref`` into the components, or ``{}``."""
        schema = copy.deepcopy(schema)
        defs: dict[str, Any] = schema.pop("$defs", {}) or {}
        mapping = {d: _UNSAFE.sub("_", f"{prefix}.{d}") for d in defs}
        while True:  # one or two rounds: a def renamed to a free name cannot clash again
            rewritten = {d: _rewrite(body, mapping) for d, body in defs.items()}
            clashes = [d for d in defs if mapping[d] in self.schemas and self.schemas[mapping[d]] != rewritten[d]]
            if not clashes:
                break
            taken = set(mapping.values())
            for d in clashes:
                mapping[d] = self._free(mapping[d], taken)
                taken.add(mapping[d])
        self.schemas.update({mapping[d]: body for d, body in rewritten.items()})
        root: dict[str, Any] = _rewrite(schema, mapping)
        if not root:
            return {}
        if set(root) == {"$ref"}:
            return root
        base = _UNSAFE.sub("_", f"{prefix}.{root.get('title') or fallback}")
        name, n = base, 2
        while name in self.schemas and self.schemas[name] != root:  # the same shape shares its name
            name, n = f"{base}_{n}", n + 1
        self.schemas[name] = root
        return {"$ref": _COMPONENTS + name}


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_DEFS):
                name = value.removeprefix(_DEFS)
                out[key] = _COMPONENTS + mapping.get(name, _UNSAFE.sub("_", name))
            else:
                out[key] = _rewrite(value, mapping)
        return out
    if isinstance(node, list):
        return [_rewrite(v, mapping) for v in node]
    return node


def _operation(service: str, ep: Endpoint, schemas: _Schemas) -> dict[str, Any]:
    handler, _, method = ep.name.partition(".")
    request = schemas.add(service, ep.request, f"{handler}{method}Request")
    response = schemas.add(service, ep.response, f"{handler}{method}Response")
    description = ep.description or f"{ep.name} of the {service} service."
    if ep.streaming:
        ok: dict[str, Any] = {
            "description": "Server-Sent Events: one `data:` line of JSON per item; `event: error` if the stream "
                           "fails after it started.",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "x-micro-item-schema": response}},
        }
    else:
        ok = {"description": "The endpoint's response.", "content": {"application/json": {"schema": response}}}
    return {
        "operationId": f"{service}.{ep.name}",
        "summary": description.strip().splitlines()[0],
        "description": description,
        "tags": [service],
        "requestBody": {"required": False, "content": {"application/json": {"schema": request}}},
        "responses": {"200": ok, "default": {"$ref": "#/components/responses/Error"}},
    }


def document(records: Sequence[ServiceRecord], *, title: str = "micro gateway", bearer: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the services in ``records`` (from ``registry.list()``).

    Args:
        records: the registry's records; several versions of a service share its paths
            (the first record that has an endpoint describes it).
        title: ``info.title``.
        bearer: declare bearer-token auth on every operation.
    """
    schemas = _Schemas()
    listing = schemas.add("micro", msgspec.json.schema(list[ServiceRecord]), "ServiceRecords")
    paths: dict[str, Any] = {
        "/api/services": {"get": {
            "operationId": "micro.services",
            "summary": "List the services in the registry.",
            "tags": ["micro"],
            "responses": {"200": {"description": "Every service, nodes merged, sorted by name and version.",
                                  "content": {"application/json": {"schema": listing}}},
                          "default": {"$ref": "#/components/responses/Error"}},
        }},
        "/api/services/{service}": {"get": {
            "operationId": "micro.service",
            "summary": "One service's records (every version).",
            "tags": ["micro"],
            "parameters": [{"name": "service", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The service's records.",
                                  "content": {"application/json": {"schema": listing}}},
                          "default": {"$ref": "#/components/responses/Error"}},
        }},
    }
    tags: list[dict[str, str]] = [{"name": "micro", "description": "The gateway's own routes."}]
    for record in records:
        if not any(t["name"] == record.name for t in tags):
            tag = {"name": record.name}
            what = record.metadata.get("description") or record.metadata.get("prompt")
            if what:
                tag["description"] = what
            tags.append(tag)
        for ep in record.endpoints:
            path = f"/api/{record.name}/{ep.name}"
            if path not in paths:
                paths[path] = {"post": _operation(record.name, ep, schemas)}
    schemas.schemas["Error"] = _ERROR_SCHEMA
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": micro_version(),
            "description": "Calls micro services over HTTP: POST a JSON request to /api/{service}/{Handler.Method}.",
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas.schemas,
            "responses": {"Error": {
                "description": "The call failed; the HTTP status follows its gRPC status.",
                "content": {"application/json": {"schema": {"$ref": _COMPONENTS + "Error"}}},
            }},
        },
    }
    if bearer:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
