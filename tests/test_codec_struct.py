"""Protobuf for code-first types: the layout, the ``.proto`` it prints, and the codec against upb.

The ``.proto`` that :mod:`micro.codec.proto_file` prints for a service is compiled by
``protoc`` (grpcio-tools) into Python classes of the official ``protobuf`` runtime (upb).
Hypothesis then checks both directions on the same values: what micro writes, upb parses
into the message built field by field from the value; what upb writes, micro reads back
as the value. The descriptor micro serves over reflection is the one protoc makes from
the text.
"""

from __future__ import annotations

import datetime as dt
import enum
import importlib
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import msgspec
import pytest
from google.protobuf import descriptor_pb2, json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import micro
from micro.codec import JSON, PROTO, codec_for
from micro.codec.layout import NotMappable, layout_of
from micro.codec.proto_file import Method, renumbered, service_file, to_text
from micro.errors import BadRequest, Internal, UsageError
from micro.registry.memory import MemoryRegistry

# -- the types ----------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Level(enum.IntEnum):
    HIGH = 5
    LOW = 0


class Inner(msgspec.Struct):
    label: str
    weight: float = 0.0


class Tree(msgspec.Struct):
    name: str
    children: list[Tree] = []


class Everything(msgspec.Struct):
    s: str
    i: int
    f: float
    b: bool
    raw: bytes
    color: Color
    level: Level
    when: dt.datetime
    took: dt.timedelta
    inner: Inner
    maybe_inner: Inner | None = None
    maybe_i: int | None = None
    five: int = 5
    tags: list[str] = []
    nums: list[int] = []
    ratios: list[float] = []
    flags: list[bool] = []
    colors: list[Color] = []
    inners: list[Inner] = []
    by_name: dict[str, int] = {}
    by_id: dict[int, Inner] = {}
    by_flag: dict[bool, Color] = {}
    extra: dict[str, Any] = {}
    anything: Any = None
    either: int | str = 0
    lit: Literal["a", "b"] = "a"
    uid: uuid.UUID | None = None
    tree: Tree | None = None
    pinned: Annotated[str, micro.field(100)] = ""


class Reply(msgspec.Struct):
    items: list[Everything]
    total: int


class Handler:
    async def Get(self, req: Everything) -> Reply:
        """Get it."""
        return Reply([req], 1)


def _file() -> descriptor_pb2.FileDescriptorProto:
    return service_file("codec-struct", [Method("Handler", "Get", layout_of(Everything), layout_of(Reply), False)])


@pytest.fixture(scope="module")
def pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The upb classes protoc makes from the printed .proto."""
    out = tmp_path_factory.mktemp("codec_struct")
    (out / "codec_struct.proto").write_text(to_text(_file()))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}",
                    f"--descriptor_set_out={out / 'set.binpb'}", str(out / "codec_struct.proto")],
                   check=True, capture_output=True)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("codec_struct_pb2")
    finally:
        sys.path.remove(str(out))


# -- the layout ---------------------------------------------------------------------------------


def test_the_printed_proto_spells_the_mapping() -> None:
    text = to_text(_file())
    for line in ["string s = 1;", "int64 i = 2;", "double f = 3;", "bool b = 4;", "bytes raw = 5;",
                 "Color color = 6;", "Level level = 7;", "google.protobuf.Timestamp when = 8;",
                 "google.protobuf.Duration took = 9;", "Inner inner = 10;", "Inner maybe_inner = 11;",
                 "optional int64 maybe_i = 12;", "optional int64 five = 13;", "repeated string tags = 14;",
                 "repeated Color colors = 18;", "map<string, int64> by_name = 20;", "map<int64, Inner> by_id = 21;",
                 "map<bool, Color> by_flag = 22;", "map<string, google.protobuf.Value> extra = 23;",
                 "google.protobuf.Value anything = 24;", "google.protobuf.Value either = 25;",
                 "optional string lit = 26;", "optional string uid = 27;", "Tree tree = 28;",
                 "string pinned = 100;", "repeated Tree children = 2;", "rpc Get(Everything) returns (Reply);",
                 "package codec_struct;", 'import "google/protobuf/timestamp.proto";',
                 "COLOR_RED = 0;", "COLOR_BLUE = 2;", "LEVEL_LOW = 0;", "LEVEL_HIGH = 5;"]:
        assert f"  {line}" in text or line in text, line


def test_the_descriptor_served_is_the_one_protoc_makes_from_the_text(pb2: ModuleType) -> None:
    found = descriptor_pb2.FileDescriptorSet.FromString(
        (Path(pb2.__file__).parent / "set.binpb").read_bytes())
    (theirs,) = found.file
    assert theirs == _file()


def test_numbers_follow_declaration_order_and_pins_keep_theirs() -> None:
    class A(msgspec.Struct):
        x: str
        y: Annotated[int, micro.field(1)] = 0
        z: bool = False

    assert [(f.name, f.number) for f in layout_of(A).fields] == [("x", 2), ("y", 1), ("z", 3)]


def test_bad_pins_are_usage_errors() -> None:
    class Twice(msgspec.Struct):
        a: Annotated[str, micro.field(3)]
        b: Annotated[str, micro.field(3)]

    with pytest.raises(UsageError, match=r"fields 'a' and 'b' are both pinned to micro.field\(3\)"):
        codec_for(Twice)
    for bad in (0, -1, 19_500, 2**29, True):
        with pytest.raises(UsageError, match="a protobuf field number is an int"):
            micro.field(bad)


def test_types_without_a_message_speak_json_only() -> None:
    with pytest.raises(NotMappable):
        layout_of(dict[str, int])

    class Renamed(msgspec.Struct, rename={"a": "not-an-identifier"}):
        a: str

    assert codec_for(Renamed).wires == (JSON,)
    assert codec_for(Everything).wires == (JSON, PROTO)


class Note(msgspec.Struct):
    id: str
    title: str


NoteV1 = Note


class Note(msgspec.Struct):  # type: ignore[no-redef]  # v2 inserts `due` without pins: title moves
    id: str
    due: str
    title: str


NoteV2 = Note


class Note(msgspec.Struct):  # type: ignore[no-redef]  # v2 with v1 numbers pinned
    id: Annotated[str, micro.field(1)]
    due: Annotated[str, micro.field(3)]
    title: Annotated[str, micro.field(2)]


NoteV2Pinned = Note


def _text(req: type) -> str:
    msg = layout_of(req)
    return to_text(service_file("notes", [Method("Notes", "Add", msg, msg, False)]))


def test_reordering_without_pins_is_detected_and_pins_fix_it() -> None:
    assert renumbered(_text(NoteV2), _text(NoteV1)) == [
        "field 2 of Note is due here and title there: pin the fields' numbers with micro.field(n)",
        "Note.title is field 3 here and 2 there: pin it with Annotated[..., micro.field(2)]",
    ]
    assert renumbered(_text(NoteV2Pinned), _text(NoteV1)) == []


class NotesV1:
    async def Add(self, req: NoteV1) -> NoteV1:
        return req


class NotesV2:
    async def Add(self, req: NoteV2) -> NoteV2:
        return req


class NotesV2Pinned:
    async def Add(self, req: NoteV2Pinned) -> NoteV2Pinned:
        return req


@pytest.mark.parametrize(("handler", "warned"), [(NotesV2, 2), (NotesV2Pinned, 0)])
async def test_a_node_that_renumbers_a_running_nodes_fields_warns(
        caplog: pytest.LogCaptureFixture, handler: type, warned: int) -> None:
    async with micro.Runtime(registry=MemoryRegistry(), store="memory://", broker="memory://") as rt:
        old = micro.Service("notes", runtime=rt)
        old.handle(NotesV1(), name="Notes")
        async with old:
            new = micro.Service("notes", runtime=rt, version="2")
            new.handle(handler(), name="Notes")
            with caplog.at_level(logging.WARNING, "micro.service"):
                async with new:
                    pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == warned, warnings
    if warned:
        assert f"differs from node {old.id} (latest, running)" in warnings[1]
        assert "Note.title is field 3 here and 2 there" in warnings[1]


# -- the codec against upb ----------------------------------------------------------------------

_ints = st.integers(-(2**63), 2**63 - 1)
_floats = st.floats(allow_nan=False)
_safe = st.integers(-(2**53) + 1, 2**53 - 1)
_json = st.recursive(
    st.none() | st.booleans() | _safe | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
_inner = st.builds(Inner, st.text(max_size=8), _floats)
_trees = st.recursive(st.builds(Tree, st.text(max_size=5)),
                      lambda sub: st.builds(Tree, st.text(max_size=5), st.lists(sub, max_size=3)), max_leaves=6)
_everything = st.builds(
    Everything,
    s=st.text(), i=_ints, f=_floats, b=st.booleans(), raw=st.binary(max_size=16),
    color=st.sampled_from(Color), level=st.sampled_from(Level),
    when=st.datetimes(timezones=st.just(dt.UTC)),
    took=st.timedeltas(min_value=dt.timedelta(seconds=-(10**10)), max_value=dt.timedelta(seconds=10**10)),
    inner=_inner, maybe_inner=st.none() | _inner, maybe_i=st.none() | _ints, five=_ints,
    tags=st.lists(st.text(max_size=5), max_size=3), nums=st.lists(_ints, max_size=3),
    ratios=st.lists(_floats, max_size=3), flags=st.lists(st.booleans(), max_size=3),
    colors=st.lists(st.sampled_from(Color), max_size=3), inners=st.lists(_inner, max_size=2),
    by_name=st.dictionaries(st.text(max_size=5), _ints, max_size=3),
    by_id=st.dictionaries(_ints, _inner, max_size=3),
    by_flag=st.dictionaries(st.booleans(), st.sampled_from(Color), max_size=2),
    extra=st.dictionaries(st.text(max_size=5), _json, max_size=3), anything=_json,
    either=_safe | st.text(max_size=5), lit=st.sampled_from(["a", "b"]), uid=st.none() | st.uuids(),
    tree=st.none() | _trees, pinned=st.text(max_size=5),
)


def _number(v: enum.Enum) -> int:
    """The documented enum numbering: an IntEnum with a 0 member keeps its values, others count from 0."""
    return int(v.value) if isinstance(v, enum.IntEnum) else list(type(v)).index(v)


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return _number(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    return v


def to_upb(value: msgspec.Struct, cls: Any) -> Any:
    """The upb message of a value, set field by field (the reference micro's codec is held to)."""
    msg = cls()
    for name in value.__struct_fields__:
        v = getattr(value, name)
        fd = cls.DESCRIPTOR.fields_by_name[name]
        if v is None:
            continue  # not set; a Value field left out reads back as None
        target = getattr(msg, name) if fd.message_type is not None or fd.is_repeated else None
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            for k, item in v.items():
                if value_fd.message_type is None:
                    target[k] = _plain(item)
                else:
                    target[k].CopyFrom(_message(item, value_fd.message_type))
        elif fd.is_repeated:
            for item in v:
                if fd.message_type is None:
                    target.append(_plain(item))
                else:
                    target.add().CopyFrom(_message(item, fd.message_type))
        elif fd.message_type is not None:
            target.CopyFrom(_message(v, fd.message_type))
        else:
            setattr(msg, name, _plain(v))
    return msg


def _message(v: Any, desc: Any) -> Any:
    from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

    if desc.full_name == "google.protobuf.Timestamp":
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(v)
        return ts
    if desc.full_name == "google.protobuf.Duration":
        d = duration_pb2.Duration()
        d.FromTimedelta(v)
        return d
    if desc.full_name == "google.protobuf.Value":
        return json_format.ParseDict(v, struct_pb2.Value())
    from google.protobuf import message_factory

    return to_upb(v, message_factory.GetMessageClass(desc))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_everything)
def test_upb_parses_what_micro_writes_and_micro_reads_what_upb_writes(pb2: ModuleType, value: Everything) -> None:
    codec = codec_for(Everything)
    expected = to_upb(value, pb2.Everything)
    assert pb2.Everything.FromString(codec.encode(value, PROTO)) == expected
    assert codec.decode(expected.SerializeToString(), PROTO, "codec-struct Handler.Get") == value
    reply = Reply([value], 7)
    assert codec_for(Reply).decode(to_upb(reply, pb2.Reply).SerializeToString(), PROTO, "w") == reply


def test_protobuf_requests_are_validated_as_json_ones_are() -> None:
    class Limited(msgspec.Struct):
        name: Annotated[str, msgspec.Meta(max_length=3)]
        color: Color = Color.RED

    codec = codec_for(Limited)
    with pytest.raises(BadRequest, match=r"^svc X.Y: Expected `str` of length <= 3 - at `\$.name`$"):
        codec.decode(b"\x0a\x04abcd", PROTO, "svc X.Y")
    with pytest.raises(BadRequest, match=r"an enum number Color does not have - at `\$.color`"):
        codec.decode(b"\x10\x07", PROTO, "svc X.Y")
    with pytest.raises(BadRequest, match=r"not UTF-8 - at `\$.name`"):
        codec.decode(b"\x0a\x02\xc3\x28", PROTO, "svc X.Y")
    with pytest.raises(BadRequest, match=r"wire type 0 for a string - at `\$.name`"):
        codec.decode(b"\x08\x01", PROTO, "svc X.Y")
    # unknown fields are skipped (proto3); a missing field is its zero value or default
    assert codec.decode(b"\x0a\x01a\xf8\x01\x05", PROTO, "w") == Limited("a")
    assert codec.decode(b"", PROTO, "w") == Limited("")


def test_strings_that_are_not_utf8_name_their_field() -> None:
    class Tagged(msgspec.Struct):
        tags: list[str]
        by_name: dict[str, int]
        inner: Inner | None = None

    codec = codec_for(Tagged)
    for data, where in [(b"\x0a\x01\xff", "$.tags"), (b"\x12\x03\x0a\x01\xff", "$.by_name"),
                        (b"\x1a\x03\x0a\x01\xff", "$.inner.label")]:
        with pytest.raises(BadRequest) as info:
            codec.decode(data, PROTO, "w")
        assert info.value.message == f"w: malformed protobuf: a string that is not UTF-8 - at `{where}`"


def test_a_response_field_of_the_wrong_type_is_an_internal_error_not_a_crash() -> None:
    with pytest.raises(Internal, match="cannot encode a Inner as protobuf"):
        codec_for(Inner).encode(Inner(label=5), PROTO)  # type: ignore[arg-type]
    with pytest.raises(Internal, match="int64"):
        codec_for(Reply).encode(Reply([], 2**70), PROTO)


# -- proto-first: descriptors rebuilt from betterproto2 classes ------------------------------------


def _normalized(fdp: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Without what betterproto2 does not keep: the file name, options, comments; messages by name."""
    out = descriptor_pb2.FileDescriptorProto.FromString(fdp.SerializeToString())
    for name in ("name", "options", "source_code_info"):
        out.ClearField(name)
    for svc in out.service:
        for method in svc.method:
            method.ClearField("options")
    for repeated in (out.message_type, out.enum_type):
        items = sorted(repeated, key=lambda m: m.name)
        del repeated[:]
        repeated.extend(items)
    return out


@pytest.mark.parametrize("which", ["greeter", "agent"])
def test_proto_first_descriptors_rebuilt_from_betterproto2_equal_protocs(which: str, tmp_path: Path) -> None:
    from _proto.greeter import HelloReply, HelloRequest

    import micro._proto.micro.agent as agent_messages
    from micro.codec.proto_file import ProtoMethod, betterproto_file

    root = Path(__file__).parent.parent
    if which == "greeter":
        source, package = root / "tests" / "proto" / "greeter.proto", "greeter"
        methods = [ProtoMethod("Greeter", "SayHello", HelloRequest, HelloReply, False),
                   ProtoMethod("Greeter", "SayMany", HelloRequest, HelloReply, True)]
    else:
        source, package = root / "proto" / "agent.proto", "micro.agent"
        methods = []  # every rpc of agent.proto, with the betterproto2 classes of its messages
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{source.parent}",
                    f"--descriptor_set_out={tmp_path / 'set.binpb'}", str(source)], check=True, capture_output=True)
    (theirs,) = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.binpb").read_bytes()).file
    if which == "agent":
        classes = vars(agent_messages)
        for svc in theirs.service:
            for m in svc.method:
                methods.append(ProtoMethod(svc.name, m.name, classes[m.input_type.rsplit(".", 1)[-1]],
                                           classes[m.output_type.rsplit(".", 1)[-1]], m.server_streaming))
        assert len(methods) >= 2
    assert _normalized(betterproto_file(package, methods)) == _normalized(theirs)


def test_unwrapped_well_known_fields_rebuild_as_their_types_equal_to_protocs(tmp_path: Path) -> None:
    """betterproto2 reads a Timestamp field as a datetime: the rebuilt descriptor still says
    google.protobuf.Timestamp and imports its file, message for message as protoc has it (reflection
    serves proto-first services whose messages hold well-known types)."""
    from _proto.kinds import HoldsStamped, Stamped

    from micro.codec.proto_file import ProtoMethod, betterproto_file, to_text

    source = Path(__file__).parent / "proto" / "kinds.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{source.parent}",
                    f"--descriptor_set_out={tmp_path / 'set.binpb'}", str(source)], check=True, capture_output=True)
    (theirs,) = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.binpb").read_bytes()).file
    ours = betterproto_file("kinds", [ProtoMethod("Stamps", "Get", Stamped, HoldsStamped, False)])
    assert list(ours.dependency) == ["google/protobuf/timestamp.proto"]
    by_name = {m.name: m for m in theirs.message_type}
    assert sorted(m.name for m in ours.message_type) == ["HoldsStamped", "Stamped"]
    for msg in ours.message_type:
        assert msg == by_name[msg.name], msg.name
    # and its text compiles back with protoc
    (tmp_path / "kinds_rebuilt.proto").write_text(to_text(ours))
    protoc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                             str(tmp_path / "kinds_rebuilt.proto")], capture_output=True, text=True)
    assert protoc.returncode == 0, protoc.stderr
