"""The ``.proto`` file of a service's code-first endpoints: a descriptor, and its text.

:func:`service_file` puts the layouts (:mod:`micro.codec.layout`) of a service's
code-first endpoints into one ``FileDescriptorProto`` (package = the service name,
one ``service`` per handler), which server reflection serves; :func:`to_text`
prints a descriptor as the ``.proto`` that ``micro describe --proto`` shows and
``protoc`` compiles back into the same descriptor (``tests/test_codec_struct.py``).

Message and enum names are the Python class names; one that is taken already in
the file (two classes called ``Item``, or a message called like a handler) gets
a number (``Item2``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2 as pb

from micro.codec import layout as L

__all__ = ["Method", "NoDescriptor", "ProtoMethod", "betterproto_file", "package_name", "renumbered", "service_file",
           "to_text", "well_known_files"]

_F = pb.FieldDescriptorProto
_TYPES = {L.STRING: _F.TYPE_STRING, L.BYTES: _F.TYPE_BYTES, L.BOOL: _F.TYPE_BOOL, L.INT64: _F.TYPE_INT64,
          L.DOUBLE: _F.TYPE_DOUBLE}
_WELL_KNOWN = {L.TIMESTAMP: ("google.protobuf.Timestamp", "google/protobuf/timestamp.proto"),
               L.DURATION: ("google.protobuf.Duration", "google/protobuf/duration.proto"),
               L.JSONVALUE: ("google.protobuf.Value", "google/protobuf/struct.proto")}
_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]")


def package_name(service: str) -> str:
    """The protobuf package of a service: its name, with what a package cannot hold replaced by ``_``."""
    parts = [_NOT_IDENT.sub("_", p) or "_" for p in service.split(".")]
    return ".".join(f"_{p}" if p[0].isdigit() else p for p in parts)


@dataclass(frozen=True)
class Method:
    """One code-first endpoint, as a method of a protobuf service."""

    handler: str
    name: str
    request: L.Message
    response: L.Message
    streaming: bool
    description: str = ""


def service_file(service: str, methods: Sequence[Method]) -> pb.FileDescriptorProto:
    """The file descriptor of a service's code-first endpoints."""
    package = package_name(service)
    fdp = pb.FileDescriptorProto(name=f"{package.replace('.', '/')}.proto", package=package, syntax="proto3")
    taken = {m.handler for m in methods}
    names: dict[int, str] = {}
    messages: list[L.Message] = []
    enums: list[L.Enum] = []
    for m in methods:
        for root in (m.request, m.response):
            for msg in root.messages():
                if id(msg) not in names:
                    names[id(msg)] = _unique(msg.name, taken)
                    messages.append(msg)
            for en in root.enums():
                if id(en) not in names:
                    names[id(en)] = _unique(en.name, taken)
                    enums.append(en)
    imports: set[str] = set()
    for en in enums:
        fdp.enum_type.append(_enum(en, names[id(en)]))
    for msg in messages:
        fdp.message_type.append(_message(msg, names, package, imports))
    fdp.dependency.extend(sorted(imports))
    services: dict[str, pb.ServiceDescriptorProto] = {}
    for m in methods:
        svc = services.get(m.handler)
        if svc is None:
            svc = services[m.handler] = fdp.service.add(name=m.handler)
        svc.method.add(name=m.name, input_type=f".{package}.{names[id(m.request)]}",
                       output_type=f".{package}.{names[id(m.response)]}", server_streaming=m.streaming or None)
    return fdp


def _unique(name: str, taken: set[str]) -> str:
    out, n = name, 2
    while out in taken:
        out, n = f"{name}{n}", n + 1
    taken.add(out)
    return out


def _enum(en: L.Enum, name: str) -> pb.EnumDescriptorProto:
    # enum values are siblings of the enum in the package's scope: a prefix keeps them apart
    prefix = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()
    out = pb.EnumDescriptorProto(name=name)
    for value, number in en.values:
        out.value.add(name=f"{prefix}_{value}", number=number)
    return out


def _message(msg: L.Message, names: Mapping[int, str], package: str, imports: set[str]) -> pb.DescriptorProto:
    out = pb.DescriptorProto(name=names[id(msg)])
    for f in msg.fields:
        fd = out.field.add(name=f.name, number=f.number, json_name=_json_name(f.name))
        if f.kind == L.MAP:
            assert f.entry is not None
            entry_name = "".join(p[:1].upper() + p[1:] for p in f.name.split("_")) + "Entry"
            entry = out.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            for sub in f.entry:
                sd = entry.field.add(name=sub.name, number=sub.number, json_name=sub.name,
                                     label=_F.LABEL_OPTIONAL)
                _type(sd, sub, names, package, imports)
            fd.label = _F.LABEL_REPEATED
            fd.type = _F.TYPE_MESSAGE
            fd.type_name = f".{package}.{out.name}.{entry_name}"
            continue
        fd.label = _F.LABEL_REPEATED if f.repeated else _F.LABEL_OPTIONAL
        _type(fd, f, names, package, imports)
        if f.presence:
            fd.proto3_optional = True
    for fd in out.field:  # synthetic oneofs come after the real ones (there are none)
        if fd.proto3_optional:
            fd.oneof_index = len(out.oneof_decl)
            out.oneof_decl.add(name=f"_{fd.name}")
    return out


def _type(fd: pb.FieldDescriptorProto, f: L.Field, names: Mapping[int, str], package: str, imports: set[str]) -> None:
    if f.kind in _TYPES:
        fd.type = _TYPES[f.kind]
    elif f.kind == L.ENUM:
        assert f.enum is not None
        fd.type = _F.TYPE_ENUM
        fd.type_name = f".{package}.{names[id(f.enum)]}"
    elif f.adapt in _WELL_KNOWN:
        full, path = _WELL_KNOWN[f.adapt]
        fd.type = _F.TYPE_MESSAGE
        fd.type_name = f".{full}"
        imports.add(path)
    else:
        assert f.message is not None
        fd.type = _F.TYPE_MESSAGE
        fd.type_name = f".{package}.{names[id(f.message)]}"


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def well_known_files() -> list[bytes]:
    """The serialized descriptors of the well-known types code-first messages use."""
    from google.protobuf import any_pb2, duration_pb2, empty_pb2, struct_pb2, timestamp_pb2, wrappers_pb2

    return [m.DESCRIPTOR.serialized_pb for m in (timestamp_pb2, duration_pb2, struct_pb2, wrappers_pb2, any_pb2,
                                                  empty_pb2)]


_WELL_KNOWN_FILES = {  # the well-known types betterproto2 unwraps to Python types, and their files
    **{f"google.protobuf.{n}": "google/protobuf/wrappers.proto" for n in (
        "DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value", "UInt32Value", "BoolValue",
        "StringValue", "BytesValue")},
    "google.protobuf.Timestamp": "google/protobuf/timestamp.proto",
    "google.protobuf.Duration": "google/protobuf/duration.proto",
    "google.protobuf.Struct": "google/protobuf/struct.proto",
    "google.protobuf.Value": "google/protobuf/struct.proto",
    "google.protobuf.ListValue": "google/protobuf/struct.proto",
    "google.protobuf.Any": "google/protobuf/any.proto",
    "google.protobuf.Empty": "google/protobuf/empty.proto",
}


# -- printing ---------------------------------------------------------------------------------

_SCALAR_NAMES = {v: k for k, v in _TYPES.items()} | {
    _F.TYPE_INT32: "int32", _F.TYPE_UINT32: "uint32", _F.TYPE_UINT64: "uint64", _F.TYPE_SINT32: "sint32",
    _F.TYPE_SINT64: "sint64", _F.TYPE_FIXED32: "fixed32", _F.TYPE_FIXED64: "fixed64",
    _F.TYPE_SFIXED32: "sfixed32", _F.TYPE_SFIXED64: "sfixed64", _F.TYPE_FLOAT: "float",
}


def to_text(fdp: pb.FileDescriptorProto, comments: Mapping[str, str] | None = None) -> str:
    """``.proto`` text of a proto3 file descriptor; ``comments`` by ``Service.Method`` go above its rpc."""
    comments = comments or {}
    lines = ['syntax = "proto3";', "", f"package {fdp.package};", ""]
    if fdp.dependency:
        lines += [f'import "{d}";' for d in fdp.dependency] + [""]
    for svc in fdp.service:
        lines.append(f"service {svc.name} {{")
        for m in svc.method:
            for line in _comment(comments.get(f"{svc.name}.{m.name}", "")):
                lines.append(f"  // {line}".rstrip())
            stream = "stream " if m.server_streaming else ""
            lines.append(f"  rpc {m.name}({_local(m.input_type, fdp.package)}) "
                         f"returns ({stream}{_local(m.output_type, fdp.package)});")
        lines += ["}", ""]
    for en in fdp.enum_type:
        lines += _enum_text(en, "")
    for msg in fdp.message_type:
        lines += _message_text(msg, fdp.package, "")
    return "\n".join(lines).rstrip() + "\n"


def _comment(text: str) -> Iterable[str]:
    return text.strip().splitlines()[:1]


def _local(type_name: str, package: str) -> str:
    name = type_name.lstrip(".")
    return name.removeprefix(f"{package}.") if name.startswith(f"{package}.") else name


def _enum_text(en: pb.EnumDescriptorProto, indent: str) -> list[str]:
    lines = [f"{indent}enum {en.name} {{"]
    lines += [f"{indent}  {v.name} = {v.number};" for v in en.value]
    return [*lines, f"{indent}}}", ""]


def _message_text(msg: pb.DescriptorProto, package: str, indent: str) -> list[str]:
    entries = {n.name: n for n in msg.nested_type if n.options.map_entry}
    lines = [f"{indent}message {msg.name} {{"]
    for fd in msg.field:
        lines.append(f"{indent}  {_field_type(fd, msg, entries, package)} {fd.name} = {fd.number};")
    for nested in msg.nested_type:
        if not nested.options.map_entry:
            lines += _message_text(nested, package, indent + "  ")
    return [*lines, f"{indent}}}", ""]


def _field_type(fd: pb.FieldDescriptorProto, msg: pb.DescriptorProto,
                entries: Mapping[str, pb.DescriptorProto], package: str) -> str:
    local = _local(fd.type_name, package)
    entry = entries.get(local.removeprefix(f"{msg.name}."))
    if entry is not None and fd.label == _F.LABEL_REPEATED:
        key, value = entry.field
        return f"map<{_field_type(key, entry, {}, package)}, {_field_type(value, entry, {}, package)}>"
    name = _SCALAR_NAMES.get(fd.type) or local
    if fd.label == _F.LABEL_REPEATED:
        return f"repeated {name}"
    if fd.proto3_optional:
        return f"optional {name}"
    return name


# -- comparing two versions -----------------------------------------------------------------------

_MESSAGE_LINE = re.compile(r"^message (\w+) \{$")
_FIELD_LINE = re.compile(r"^  (.+) (\w+) = (\d+);$")


def _fields_of(text: str) -> dict[tuple[str, str], tuple[int, str]]:
    out: dict[tuple[str, str], tuple[int, str]] = {}
    message = ""
    for line in text.splitlines():
        if m := _MESSAGE_LINE.match(line):
            message = m[1]
        elif (f := _FIELD_LINE.match(line)) and message:
            out[(message, f[2])] = (int(f[3]), f[1].removeprefix("optional "))
    return out


def renumbered(mine: str, theirs: str) -> list[str]:
    """Where two ``.proto`` texts of one service disagree on the wire: fields that moved or changed type.

    Peers that disagree read each other's fields as other fields (or drop them): the
    remedy is to pin the numbers of the older version with :func:`micro.field`.
    """
    a, b = _fields_of(mine), _fields_of(theirs)
    problems = []
    by_number = {(msg, num): name for (msg, name), (num, _) in b.items()}
    for (msg, name), (num, kind) in a.items():
        other = b.get((msg, name))
        if other is not None and other[0] != num:
            problems.append(f"{msg}.{name} is field {num} here and {other[0]} there: "
                            f"pin it with Annotated[..., micro.field({other[0]})]")
        elif other is not None and other[1] != kind:
            problems.append(f"{msg}.{name} (field {num}) is {kind} here and {other[1]} there")
        elif other is None and (msg, num) in by_number:
            problems.append(f"field {num} of {msg} is {name} here and {by_number[(msg, num)]} there: "
                            f"pin the fields' numbers with micro.field(n)")
    return problems


# -- proto-first: the descriptor of betterproto2 classes ------------------------------------------

_BP_TYPES = {
    "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT, "int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32, "fixed64": _F.TYPE_FIXED64, "fixed32": _F.TYPE_FIXED32, "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "uint32": _F.TYPE_UINT32, "sfixed32": _F.TYPE_SFIXED32,
    "sfixed64": _F.TYPE_SFIXED64, "sint32": _F.TYPE_SINT32, "sint64": _F.TYPE_SINT64,
}


class NoDescriptor(Exception):
    """A betterproto2 class whose descriptor cannot be rebuilt (a well-known type it unwraps, a foreign package)."""


@dataclass(frozen=True)
class ProtoMethod:
    """One proto-first endpoint: betterproto2 request and response classes."""

    handler: str
    name: str
    request: type
    response: type
    streaming: bool


def betterproto_file(package: str, methods: Sequence[ProtoMethod]) -> pb.FileDescriptorProto:
    """The file descriptor of proto-first endpoints, rebuilt from their betterproto2 classes.

    betterproto2 does not keep the descriptors it was generated from; the field
    numbers, types, labels, oneofs, maps and names it keeps are what the wire and
    proto3 JSON depend on, so the rebuilt file is wire-equal to the original (its
    comments and options are gone, and enums nested in a message move to the top
    level, as betterproto2 names them). Raises :class:`NoDescriptor` for classes of
    other packages. Fields betterproto2 unwraps to Python types (a ``Timestamp`` read as a
    ``datetime``, a ``StringValue`` as ``str | None``) are their well-known types, imported.
    """
    import dataclasses

    from betterproto2 import FieldMetadata

    fdp = pb.FileDescriptorProto(name=f"{package.replace('.', '/')}.proto", package=package, syntax="proto3")
    names: dict[Any, str] = {}  # class -> full name
    todo: list[Any] = [c for m in methods for c in (m.request, m.response)]
    while todo:
        cls = todo.pop()
        if cls in names:
            continue
        full = _pool_name(cls)
        if not full.startswith(f"{package}."):
            raise NoDescriptor(f"{cls.__qualname__} is in another package ({full})")
        names[cls] = full
        classes = cls._betterproto.cls_by_field
        for f in dataclasses.fields(cls):
            fm = FieldMetadata.get(f)
            if fm.proto_type == "message" and fm.unwrap is None:
                todo.append(classes[f.name])
            elif fm.proto_type == "map" and fm.map_meta is not None and fm.map_meta[1].proto_type == "message" \
                    and fm.map_meta[1].unwrap is None:
                todo.append(classes[f"{f.name}.value"])
    enums: dict[Any, str] = {}
    imports: set[str] = set()
    by_full: dict[str, pb.DescriptorProto] = {}
    for cls, full in sorted(names.items(), key=lambda kv: kv[1].count(".")):
        parent, _, short = full.rpartition(".")
        holder = by_full.get(parent)
        msg = (holder.nested_type if holder is not None else fdp.message_type).add(name=short)
        by_full[full] = msg
        _betterproto_fields(cls, msg, names, enums, package, full, imports)
    fdp.dependency.extend(sorted(imports))
    for cls, full in enums.items():
        en = fdp.enum_type.add(name=full.rsplit(".", 1)[-1])
        renamed = cls.betterproto_value_to_renamed_proto_names()
        for member in cls:
            en.value.add(name=renamed.get(int(member), member.name), number=int(member))
    services: dict[str, pb.ServiceDescriptorProto] = {}
    for m in methods:
        svc = services.get(m.handler)
        if svc is None:
            svc = services[m.handler] = fdp.service.add(name=m.handler)
        svc.method.add(name=m.name, input_type=f".{names[m.request]}", output_type=f".{names[m.response]}",
                       server_streaming=m.streaming or None)
    return fdp


def _pool_name(cls: type) -> str:
    pool = getattr(sys.modules.get(cls.__module__), "default_message_pool", None)
    url: str | None = pool.type_to_url.get(cls) if pool is not None else None
    if url is None:
        raise NoDescriptor(f"{cls.__qualname__} is not in its module's message pool")
    return url.rsplit("/", 1)[-1]


def _betterproto_fields(cls: Any, msg: pb.DescriptorProto, names: Mapping[type, str], enums: dict[Any, str],
                        package: str, full: str, imports: set[str]) -> None:
    import dataclasses

    from betterproto2 import FieldMetadata

    classes = cls._betterproto.cls_by_field
    oneofs: dict[str, int] = {}
    for f in dataclasses.fields(cls):
        fm = FieldMetadata.get(f)
        fd = msg.field.add(name=f.name, number=fm.number, json_name=_json_name(f.name))
        if fm.proto_type == "map":
            assert fm.map_meta is not None
            entry_name = "".join(p[:1].upper() + p[1:] for p in f.name.split("_")) + "Entry"
            entry = msg.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            for sub_meta, sub_name in zip(fm.map_meta, ("key", "value"), strict=True):
                sd = entry.field.add(name=sub_name, number=sub_meta.number, json_name=sub_name,
                                     label=_F.LABEL_OPTIONAL)
                if sub_meta.unwrap is not None:
                    _well_known(sd, sub_meta.unwrap(), imports)
                else:
                    _bp_type(sd, sub_meta.proto_type, classes.get(f"{f.name}.value"), names, enums, package)
            fd.label, fd.type, fd.type_name = _F.LABEL_REPEATED, _F.TYPE_MESSAGE, f".{full}.{entry_name}"
            continue
        fd.label = _F.LABEL_REPEATED if fm.repeated else _F.LABEL_OPTIONAL
        if fm.unwrap is not None:
            _well_known(fd, fm.unwrap(), imports)
        else:
            _bp_type(fd, fm.proto_type, classes.get(f.name), names, enums, package)
        if fm.group:
            fd.oneof_index = oneofs.setdefault(fm.group, len(oneofs))
        elif fm.optional and fm.proto_type != "message":
            fd.proto3_optional = True
    for group in oneofs:
        msg.oneof_decl.add(name=group)
    for fd in msg.field:  # synthetic oneofs after the real ones
        if fd.proto3_optional:
            fd.oneof_index = len(msg.oneof_decl)
            msg.oneof_decl.add(name=f"_{fd.name}")


def _well_known(fd: pb.FieldDescriptorProto, cls: type, imports: set[str]) -> None:
    """A field betterproto2 unwraps: the well-known message type it is on the wire."""
    full = _pool_name(cls)
    file = _WELL_KNOWN_FILES.get(full)
    if file is None:
        raise NoDescriptor(f"{full}: an unwrapped type that is not a well-known one")
    fd.type, fd.type_name = _F.TYPE_MESSAGE, f".{full}"
    imports.add(file)


def _bp_type(fd: pb.FieldDescriptorProto, proto_type: str, cls: Any, names: Mapping[type, str],
             enums: dict[Any, str], package: str) -> None:
    if proto_type in _BP_TYPES:
        fd.type = _BP_TYPES[proto_type]
    elif proto_type == "enum":
        fd.type = _F.TYPE_ENUM
        fd.type_name = "." + enums.setdefault(cls, f"{package}.{cls.__name__}")
    elif proto_type == "message":
        if cls not in names:
            raise NoDescriptor(f"{getattr(cls, '__qualname__', cls)} is not a message of this package")
        fd.type, fd.type_name = _F.TYPE_MESSAGE, f".{names[cls]}"
    else:
        raise NoDescriptor(f"a field of type {proto_type}")
