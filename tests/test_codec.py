"""Codecs and schemas: msgspec Structs and betterproto2 messages, their JSON Schemas, and
``BadRequest`` naming the failing field for dicts, JSON and proto JSON."""

from __future__ import annotations

import ast
import enum
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import msgspec
import pytest
from _proto.greeter import HelloReply, HelloRequest, Person, Tone

import micro
from micro.codec import JSON, PROTO, ProtoCodec, StructCodec, codec_for
from micro.errors import BadRequest, UsageError
from micro.registry.memory import MemoryRegistry

HERE = Path(__file__).parent


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(msgspec.Struct):
    city: str
    zip: str = ""


class CreateUser(msgspec.Struct):
    user_id: str
    age: int
    color: Color
    address: Address
    kind: Literal["admin", "member"] = "member"
    tags: list[str] = []


class Counts(msgspec.Struct):
    by_id: dict[int, int]


class Users:
    async def Create(self, req: CreateUser) -> Address:
        """Create a user."""
        return req.address


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        """Greet someone (proto-first)."""
        return HelloReply(message=f"hi {req.name}")


# -- msgspec Structs --------------------------------------------------------------------------


def test_struct_schema_has_nested_types_required_fields_and_enums() -> None:
    schema = codec_for(CreateUser).schema()
    assert schema["type"] == "object"  # the root is the object itself, not a bare $ref
    assert schema["title"] == "CreateUser"
    assert schema["required"] == ["user_id", "age", "color", "address"]
    assert schema["properties"]["user_id"] == {"type": "string"}
    assert schema["properties"]["kind"]["enum"] == ["admin", "member"]
    assert schema["properties"]["address"] == {"$ref": "#/$defs/Address"}
    assert schema["$defs"]["Address"]["required"] == ["city"]
    assert sorted(schema["$defs"]["Color"]["enum"]) == ["blue", "red"]
    assert "CreateUser" not in schema["$defs"]


class Tree(msgspec.Struct):
    children: list[Tree] = []


def test_recursive_struct_schema_keeps_its_definition() -> None:
    schema = codec_for(Tree).schema()
    assert schema["type"] == "object"
    assert schema["properties"]["children"]["items"] == {"$ref": "#/$defs/Tree"}
    assert "Tree" in schema["$defs"]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"user_id": 5, "age": 1, "color": "red", "address": {"city": "x"}}, "$.user_id"),
        ({"user_id": "a", "age": "old", "color": "red", "address": {"city": "x"}}, "$.age"),
        ({"user_id": "a", "age": 1, "color": "green", "address": {"city": "x"}}, "$.color"),
        ({"user_id": "a", "age": 1, "color": "red", "address": {"city": 3}}, "$.address.city"),
        ({"user_id": "a", "age": 1, "color": "red", "address": {"city": "x"}, "tags": [1]},
         "$.tags[0]"),
    ],
)
@pytest.mark.parametrize("form", ["dict", "json-str", "json-bytes"])
def test_struct_bad_request_names_the_field(value: dict[str, object], field: str, form: str) -> None:
    codec = codec_for(CreateUser)
    arg: object = value
    if form != "dict":
        text = msgspec.json.encode(value)
        arg = text.decode() if form == "json-str" else text
    with pytest.raises(BadRequest) as info:
        codec.convert(arg, "users Users.Create")
    assert f"`{field}`" in info.value.message
    assert info.value.message.startswith("users Users.Create: ")
    assert info.value.code == "INVALID_ARGUMENT"


def test_struct_missing_field_and_malformed_json() -> None:
    codec = codec_for(CreateUser)
    with pytest.raises(BadRequest, match="missing required field `user_id`"):
        codec.convert({"age": 1, "color": "red", "address": {"city": "x"}}, "w")
    with pytest.raises(BadRequest, match="malformed JSON"):
        codec.convert('{"user_id": ', "w")
    with pytest.raises(BadRequest, match="malformed JSON"):
        codec.decode(b"not json", JSON, "w")
    with pytest.raises(BadRequest, match=r"Expected `object`, got `array`"):
        codec.convert([1, 2], "w")


def test_struct_json_text_and_dicts_convert_to_the_type() -> None:
    codec = codec_for(Address)
    assert codec.convert('{"city": "Oslo"}', "w") == Address("Oslo")
    assert codec.convert(b'{"city": "Oslo"}', "w") == Address("Oslo")
    assert codec.convert({"city": "Oslo"}, "w") == Address("Oslo")
    same = Address("Oslo")
    assert codec.convert(same, "w") is same


def test_struct_dict_form_is_what_its_json_decodes_to() -> None:
    codec = codec_for(Counts)
    value = Counts(by_id={1: 2, 3: 4})
    wire = msgspec.json.decode(codec.encode(value, JSON))
    assert codec.to_builtins(value) == wire == {"by_id": {"1": 2, "3": 4}}
    assert codec.from_builtins(wire, "w") == value


def test_struct_codec_speaks_protobuf_and_refuses_it_for_types_without_a_message() -> None:
    assert codec_for(Address).decode(b"\x0a\x01x", PROTO, "w") == Address("x")
    with pytest.raises(BadRequest, match="takes JSON, not proto"):
        codec_for(dict[str, int]).decode(b"\x0a\x01x", PROTO, "w")


def test_types_msgspec_cannot_handle_are_a_usage_error() -> None:
    class NotAMessage:
        pass

    with pytest.raises(UsageError, match=r"msgspec\.Struct or a betterproto2 message"):
        codec_for(NotAMessage)


# -- betterproto2 messages --------------------------------------------------------------------


def test_proto_schema_has_nested_messages_enums_maps_and_lists() -> None:
    schema = codec_for(HelloRequest).schema()
    assert schema["type"] == "object"
    assert schema["title"] == "HelloRequest"
    props = schema["properties"]
    assert props["name"] == {"type": "string"}
    assert props["times"] == {"type": "integer"}
    # the enum's names as proto3 JSON writes them (and as the .proto spells them)
    assert props["tone"] == {"type": "string",
                             "enum": ["TONE_UNSPECIFIED", "TONE_WARM", "TONE_FORMAL"]}
    assert props["sender"] == {"$ref": "#/$defs/Person"}
    assert schema["$defs"]["Person"]["properties"] == {"name": {"type": "string"},
                                                      "age": {"type": "integer"}}
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["counts"]["type"] == "object"
    assert "required" not in schema  # proto3 fields are all optional


def test_proto_enum_names_in_the_schema_are_what_the_json_wire_carries() -> None:
    codec = codec_for(HelloRequest)
    wire = msgspec.json.decode(codec.encode(HelloRequest(tone=Tone.WARM), JSON))
    assert wire["tone"] in codec.schema()["properties"]["tone"]["enum"]


def test_proto_package_comes_from_the_generated_code() -> None:
    codec = codec_for(HelloRequest)
    assert isinstance(codec, ProtoCodec)
    assert codec.package == "greeter"


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"name": 5}, "$.name"),
        ({"times": "three"}, "$.times"),
        ({"times": 2**40}, "$.times"),  # out of int32 range
        ({"tone": "TONE_LOUD"}, "$.tone"),
        ({"sender": {"age": "x"}}, "$.sender.age"),
        ({"sender": 5}, "$.sender"),
        ({"tags": ["a", 1]}, "$.tags[1]"),
        ({"counts": {"a": "x"}}, "$.counts['a']"),
        ({"nmae": "typo"}, "$"),
    ],
)
@pytest.mark.parametrize("form", ["dict", "json-str", "json-bytes"])
def test_proto_bad_request_names_the_field(value: dict[str, object], field: str, form: str) -> None:
    codec = codec_for(HelloRequest)
    arg: object = value
    if form != "dict":
        text = msgspec.json.encode(value)
        arg = text.decode() if form == "json-str" else text
    with pytest.raises(BadRequest) as info:
        codec.convert(arg, "greeter Greeter.SayHello")
    assert f"at `{field}`" in info.value.message


def test_proto_malformed_json_and_non_objects() -> None:
    codec = codec_for(HelloRequest)
    with pytest.raises(BadRequest, match="malformed JSON"):
        codec.decode(b'{"name": ', JSON, "w")
    with pytest.raises(BadRequest, match="expected an object"):
        codec.convert([1], "w")


def test_proto_accepts_proto3_json_forms() -> None:
    codec = codec_for(HelloRequest)
    msg = codec.convert(
        {"name": "ann", "tone": "TONE_FORMAL", "sender": {"name": "bo", "age": 7},
         "counts": {"a": "12", "b": 3}, "tags": ["x"]}, "w")
    assert msg == HelloRequest(name="ann", tone=Tone.FORMAL, sender=Person(name="bo", age=7),
                               counts={"a": 12, "b": 3}, tags=["x"])
    assert codec.convert({"tone": 2}, "w").tone == Tone.FORMAL


def test_proto_wires_round_trip_and_dict_form_matches_json() -> None:
    codec = codec_for(HelloRequest)
    msg = HelloRequest(name="ann", times=2, tone=Tone.WARM, sender=Person(name="bo", age=7),
                       tags=["x"], counts={"a": 2**40})
    assert codec.decode(codec.encode(msg, PROTO), PROTO, "w") == msg
    assert codec.decode(codec.encode(msg, JSON), JSON, "w") == msg
    assert codec.to_builtins(msg) == msgspec.json.decode(codec.encode(msg, JSON))
    assert codec.to_builtins(msg)["counts"] == {"a": str(2**40)}  # proto3 JSON: int64 as string


def test_struct_and_proto_convert_into_each_other() -> None:
    class Hello(msgspec.Struct):
        name: str
        times: int = 0

    assert codec_for(HelloRequest).convert(Hello("ann", 2), "w") == HelloRequest(name="ann", times=2)
    assert codec_for(HelloReply).convert(HelloReply(message="m"), "w") == HelloReply(message="m")
    got = codec_for(Hello).convert(HelloRequest(name="ann", times=2), "w")
    assert got == Hello("ann", 2)


def test_codec_kinds() -> None:
    assert isinstance(codec_for(Address), StructCodec)
    assert codec_for(Address).wires == (JSON, PROTO)
    assert codec_for(dict[str, int]).wires == (JSON,)
    assert isinstance(codec_for(HelloRequest), ProtoCodec)
    assert codec_for(HelloRequest).wires == (PROTO, JSON)
    assert codec_for(Address) is codec_for(Address)


def test_committed_betterproto_code_matches_the_proto(tmp_path: Path) -> None:
    """tests/_proto is generated from tests/proto/greeter.proto: regenerate and compare."""
    bindir = Path(sys.executable).parent
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE / 'proto'}",
         f"--plugin=protoc-gen-python_betterproto2={bindir / 'protoc-gen-python_betterproto2'}",
         f"--python_betterproto2_out={tmp_path}",
         "--python_betterproto2_opt=client_generation=async",
         "--python_betterproto2_opt=server_generation=async",
         str(HERE / "proto" / "greeter.proto")],
        check=True, capture_output=True,
        env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"},  # it runs ruff
    )
    for rel in ("greeter/__init__.py", "message_pool.py"):  # same code, whatever the formatting
        fresh = ast.dump(ast.parse((tmp_path / rel).read_text()))
        assert fresh == ast.dump(ast.parse((HERE / "_proto" / rel).read_text())), rel


# -- schemas in the registry record -----------------------------------------------------------


async def test_registry_record_carries_schemas_descriptions_and_wires() -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt:
        service = micro.Service("users", runtime=rt)
        service.handle(Users())
        service.handle(Greeter())
        async with service:
            (record,) = await registry.get("users")
    create = record.endpoint("Users.Create")
    greet = record.endpoint("Greeter.SayHello")
    assert create is not None and greet is not None
    assert create.request == codec_for(CreateUser).schema()
    assert create.request["required"] == ["user_id", "age", "color", "address"]
    assert create.response == codec_for(Address).schema()
    assert create.description == "Create a user."
    assert create.wires == ["proto", "json"]  # code-first: protobuf (the derived .proto) and JSON
    assert greet.request == codec_for(HelloRequest).schema()
    assert greet.response["properties"]["message"] == {"type": "string"}
    assert greet.wires == ["proto", "json"]
    assert greet.path == "/greeter.Greeter/SayHello"
    assert create.path == "/users.Users/Create"
    # the record survives the registry's own encoding
    decoded = msgspec.json.decode(msgspec.json.encode(record), type=type(record))
    assert decoded == record


def test_protobuf_bytes_round_trip_through_the_wire_check() -> None:
    codec = codec_for(HelloRequest)
    msg = HelloRequest(name="ann", times=-3, tone=Tone.WARM, sender=Person(name="b", age=4),
                       tags=["x", "y"], counts={"a": 2**40, "b": -1})
    assert codec.decode(bytes(msg), PROTO, "w") == msg
    assert codec.decode(b"", PROTO, "w") == HelloRequest()
    assert codec.decode(b"\xf8\x01\x05", PROTO, "w") == HelloRequest()  # unknown field 31: kept


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x0a\x05ab", "truncated - at `$.name`"),  # claims 5 bytes, has 2
        (b"\x22\x03\x0a\x05a", "truncated - at `$.sender.name`"),
        (b"\x0b", "wire type 3 - at `$.name`"),  # betterproto2 alone makes name=None of it
        (b"\x08\x01", "wire type 0 for a string - at `$.name`"),
        (b"\x15abcd", "wire type 5 for a int32 - at `$.times`"),
        (b"\x10", "bad varint - at `$.times`"),
        (b"\xff\xff", "bad varint"),
    ],
)
def test_malformed_protobuf_is_bad_request(data: bytes, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        codec_for(HelloRequest).decode(data, PROTO, "greeter Greeter.SayHello")
    assert needle in info.value.message
    assert info.value.message.startswith("greeter Greeter.SayHello: malformed protobuf")
