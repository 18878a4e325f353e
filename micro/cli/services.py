"""``micro services`` and ``micro describe``: what the registry knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import msgspec
from rich.table import Table

from micro.cli.main import cli_runtime, main, missing, out, run_async
from micro.errors import ServiceNotFound
from micro.registry import ServiceRecord
from micro.server.grpc import FILE_MARK


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry records as JSON.")
@run_async
async def services(as_json: bool) -> None:
    """List the services in the registry."""
    async with cli_runtime() as rt:
        records = await rt.registry.list()
    if as_json:
        out.print_json(msgspec.json.encode(records).decode())
        return
    if not records:
        out.print("no services registered (start one with `micro run PATH`)")
        return
    table = Table("service", "version", "type", "endpoints", "nodes")
    for rec in records:
        table.add_row(
            rec.name, rec.version, rec.metadata.get("type", "service"),
            str(len(rec.endpoints)), ", ".join(n.address for n in rec.nodes),
        )
    out.print(table)


@main.command()
@click.argument("service")
@click.option("--json", "as_json", is_flag=True, help="Print the registry records as JSON.")
@click.option("--proto", "as_proto", is_flag=True,
              help="Print the service's .proto files (the protobuf contract of its endpoints, for any gRPC client).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="With --proto: write each .proto file into this directory (ready for protoc -I DIR).")
@run_async
async def describe(service: str, as_json: bool, as_proto: bool, out_dir: Path | None) -> None:
    """Show a service's endpoints, schemas and nodes."""
    if out_dir is not None and not as_proto:
        raise click.UsageError("--out writes the .proto files: use it with --proto")
    async with cli_runtime() as rt:
        try:
            records = await rt.registry.get(service)
        except ServiceNotFound:
            await missing(rt, service)
    if as_json:
        out.print_json(msgspec.json.encode(records).decode())
        return
    if as_proto and out_dir is not None:
        for rec in records:
            for name, text in proto_files(rec):
                path = out_dir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                out.print(str(path), markup=False)
        return
    if as_proto:
        for rec in records:
            out.print(service_proto(rec), markup=False)
        return
    for rec in records:
        out.print(f"[bold]{rec.name}[/bold] {rec.version}")
        for k, v in sorted(rec.metadata.items()):
            out.print(f"  {k}: {v}")
        for node in rec.nodes:
            native = node.metadata.get("native")
            wires = f"gRPC {node.address}" + (f", native {native}" if native else " (no native wire)")
            out.print(f"  node {node.id} at {node.address} ({wires})", markup=False)
            if node.metadata.get("native_unix"):  # micro.wire.unix
                out.print(f"    native wire on this host: {node.metadata['native_unix']}", markup=False)
        for ep in rec.endpoints:
            kind = " (stream)" if ep.streaming else ""
            out.print(f"\n  [cyan]{ep.name}[/cyan]{kind}  {ep.path}")
            if ep.description:
                out.print(f"    {ep.description.splitlines()[0]}")
            out.print(f"    request:  {_brief(ep.request)}", markup=False)
            out.print(f"    response: {_brief(ep.response)}", markup=False)


def _brief(schema: dict[str, Any]) -> str:
    root = _deref(schema, schema)
    props = root.get("properties", {})
    required = set(root.get("required", []))
    parts = [f"{k}{'' if k in required else '?'}: {_type(v, schema)}" for k, v in props.items()]
    return "{" + ", ".join(parts) + "}"


def _deref(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        found: dict[str, Any] = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
        return found
    return node


def _type(node: dict[str, Any], root: dict[str, Any]) -> str:
    if "$ref" in node:
        return str(node["$ref"]).rsplit("/", 1)[-1]
    if node.get("type") == "array":
        return f"[{_type(node.get('items', {}), root)}]"
    if "anyOf" in node:
        return " | ".join(_type(n, root) for n in node["anyOf"])
    if "enum" in node:
        return " | ".join(repr(v) for v in node["enum"])
    return str(node.get("type", "any"))


_PROTO_SCALARS = {"string": "string", "integer": "int64", "number": "double", "boolean": "bool"}


def proto_files(rec: ServiceRecord) -> list[tuple[str, str]]:
    """The ``.proto`` files of a service as (file name, text): what its first node registered (the files
    of its code-first and proto-first endpoints), or a sketch from the JSON Schemas for nodes that
    registered none (older micro versions)."""
    text = next((n.metadata["proto"] for n in rec.nodes if n.metadata.get("proto")), None)
    if text is None:
        return [(f"{rec.name.replace('-', '_')}.proto", to_proto(rec))]
    files: list[tuple[str, str]] = []
    for chunk in text.split(FILE_MARK):
        if chunk.strip():
            files.append((chunk.partition("\n")[0].strip(), FILE_MARK + chunk))
    return files or [(f"{rec.name.replace('-', '_')}.proto", text)]


def service_proto(rec: ServiceRecord) -> str:
    """The ``.proto`` files a service's nodes registered (each headed ``// file: NAME``): the wire contract of
    its code-first endpoints, and its proto-first ones' as rebuilt from their betterproto2 classes.

    Nodes of one version that disagree each get theirs printed. Nodes of micro versions that
    registered none get a sketch from the JSON Schemas.
    """
    texts = list(dict.fromkeys(n.metadata["proto"] for n in rec.nodes if n.metadata.get("proto")))
    if not texts:
        return to_proto(rec)
    out = texts[0] if len(texts) == 1 else "\n".join(
        f"// node {n.id}\n{n.metadata['proto']}" for n in rec.nodes if n.metadata.get("proto"))
    others = [ep for ep in rec.endpoints if "proto" in ep.wires and not _in_text(ep.path, texts[0])]
    if others:
        names = ", ".join(f"{ep.name} ({ep.path})" for ep in others)
        out += f"\n// also served as protobuf, from their own .proto files: {names}\n"
    return out


def _in_text(path: str, text: str) -> bool:
    service, _, method = path.strip("/").partition("/")
    return f"service {service.rsplit('.', 1)[-1]} {{" in text and f"rpc {method}(" in text


def to_proto(rec: ServiceRecord) -> str:
    """A ``.proto`` sketch of a service from its endpoints' JSON Schemas."""
    messages: dict[str, str] = {}
    handlers: dict[str, list[str]] = {}
    package = rec.name.replace("-", "_")
    for ep in rec.endpoints:
        handler, _, method = ep.name.partition(".")
        package = ep.path.split("/")[1].rsplit(".", 1)[0].replace("-", "_")
        req = _proto_message(ep.request, ep.request, messages, f"{method}Request")
        rsp = _proto_message(ep.response, ep.response, messages, f"{method}Response")
        stream = "stream " if ep.streaming else ""
        doc = f"  // {ep.description.splitlines()[0]}\n" if ep.description else ""
        handlers.setdefault(handler, []).append(f"{doc}  rpc {method}({req}) returns ({stream}{rsp});")
    lines = ['syntax = "proto3";', "", f"package {package};", ""]
    for handler, rpcs in handlers.items():
        lines += [f"service {handler} {{", *rpcs, "}", ""]
    lines += list(messages.values())
    return "\n".join(lines).rstrip() + "\n"


def _proto_message(schema: dict[str, Any], root: dict[str, Any], messages: dict[str, str], fallback: str) -> str:
    node = _deref(schema, root)
    name = str(node.get("title") or fallback)
    if name in messages:
        return name
    messages[name] = ""  # reserve: recursive types refer to themselves
    fields = []
    for i, (fname, fschema) in enumerate(node.get("properties", {}).items(), start=1):
        fields.append(f"  {_proto_type(fschema, root, messages, fname)} {fname} = {i};")
    messages[name] = "\n".join([f"message {name} {{", *fields, "}", ""])
    return name


def _proto_type(node: dict[str, Any], root: dict[str, Any], messages: dict[str, str], fname: str) -> str:
    if node.get("type") == "array":
        return "repeated " + _proto_type(node.get("items", {}), root, messages, fname).removeprefix("repeated ")
    if "$ref" in node or (node.get("type") == "object" and "properties" in node):
        return _proto_message(node, root, messages, fname.title().replace("_", ""))
    if node.get("type") == "object":
        return "map<string, string>"
    if "anyOf" in node:
        kinds = [n.get("type") for n in node["anyOf"] if n.get("type") != "null"]
        return _PROTO_SCALARS.get(str(kinds[0]), "string") if kinds else "string"
    return _PROTO_SCALARS.get(str(node.get("type")), "string")
