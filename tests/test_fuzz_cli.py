"""Fuzzing ``micro call``'s JSON argument, in process and as a program.

In process: ``micro.cli.call.parse_request`` (what ``micro call`` makes of its JSON argument
or of stdin) is checked against Python's own ``json`` module on random text, argument bytes
that are not UTF-8 (they arrive as lone surrogates), stdin bytes, valid and truncated JSON,
and deep nesting: where ``json`` reads a value, so must it; where ``json`` refuses, it raises
``UsageError`` (exit code 2) with a one-line message. And ``micro.cli.main.fail``, which prints
every error, must print one line whatever the message holds (rich markup such as ``[/x]``,
line breaks, emoji codes).

As a program: a handful of real ``micro call`` runs against a running service, each a bad
request, each ending with exit code 2 (the argument) or 1 (the call) and one line on stderr.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from _proto.greeter import HelloReply, HelloRequest
from hypothesis import strategies as st
from test_fuzz_kit import CASES, Host, deep, fuzz, json_values, mutate, mutations

import micro
from micro.cli.call import parse_request
from micro.errors import UsageError

pytestmark = pytest.mark.fuzz

cli_main = importlib.import_module("micro.cli.main")  # the module (micro.cli.main is also the click group)
ROOT = Path(__file__).resolve().parent.parent
MICRO = [sys.executable, "-m", "micro.cli"]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


requests = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=20),  # lone surrogates too
    st.binary(max_size=40).map(os.fsdecode),  # argument bytes as Python decodes them (surrogateescape)
    st.binary(max_size=40),  # stdin bytes
    json_values().map(_dumps),
    json_values().map(lambda v: _dumps(v).encode()),
    st.builds(lambda v, m: mutate(_dumps(v).encode(), *m), json_values(), mutations),
    st.builds(lambda d, k: deep(d, k).decode(), st.integers(1, 200) | st.integers(3000, 20_000),
              st.sampled_from(["array", "object", "unclosed"])),
    st.sampled_from(["", " ", "{}", "[]", "null", "NaN", '{"a": NaN}', "Infinity", "1e400", "-0", '"\\ud800"',
                     '{"a": 1, "a": 2}', "\ufeff{}", "{}\n", "{} {}", '{"user_id": "alice"}', "1" * 400]),
)


def reference(request: str | bytes) -> tuple[bool | None, Any]:
    """What Python's json module reads: (ok, value); ok is None where the two may rightly differ."""
    try:
        text = request if isinstance(request, str) else request.decode("utf-8")
        text.encode()
    except UnicodeError:
        return False, None
    if not text:
        return True, {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False, None
    try:  # NaN, Infinity, 1e400 and "\ud800" are Python's extensions to JSON: msgspec refuses them
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeError):
        return None, None
    return True, value


def check_parse(request: str | bytes) -> None:
    ok, expected = reference(request)
    try:
        got = parse_request(request)
    except UsageError as exc:
        assert ok is not True, f"json reads {expected!r}, micro call refused it: {exc}"
        assert str(exc).startswith("the request is not valid") and len(str(exc).splitlines()) == 1, str(exc)
        return
    assert ok is not False, f"json refuses it, micro call read {got!r}"
    if ok:
        assert got == expected


def test_fuzz_cli_request_parsing() -> None:
    """The JSON argument: what json reads is read alike; the rest is a one-line UsageError (exit 2)."""
    assert fuzz(requests, check_parse) >= CASES


messages = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=20),
    st.lists(st.sampled_from(["[/x]", "[bold]", "[", "]", "\\", ":warning:", "\n", "\r\n", "\u2028", "\x1c", "\x85",
                              "\t", "\x1b[31m", "error", "`$.a`", " "]), max_size=8).map("".join),
)


def check_fail(message: str) -> None:
    err = cli_main.err
    out, err.file = err.file, io.StringIO()
    try:
        with pytest.raises(SystemExit) as info:
            cli_main.fail(message, 2)
        printed = err.file.getvalue()
    finally:
        err.file = out
    assert info.value.code == 2
    assert printed.endswith("\n") and len(printed.splitlines()) == 1, printed
    assert printed.startswith("error: "), printed


def test_fuzz_cli_error_lines() -> None:
    """Every error line is one line, whatever the message quotes (a smaller property: 2,000 cases)."""
    assert fuzz(messages, check_fail, max_examples=2_000) >= 2_000


# -- as a program ------------------------------------------------------------------------------


class Greeter:
    async def SayHello(self, req: HelloRequest) -> HelloReply:
        """A proto-first endpoint: unknown fields are refused, naming the field."""
        return HelloReply(message=req.name)


@asynccontextmanager
async def serving() -> AsyncIterator[micro.Service]:
    async with micro.Runtime(registry="local://", store="memory://", broker="memory://") as rt:
        service = micro.Service("greeter", runtime=rt)
        service.handle(Greeter())
        async with service:
            yield service


BAD_CALLS: list[tuple[list[bytes], bytes | None, int, str]] = [  # argv, stdin, exit code, in the error line
    ([b"{oops"], None, 2, "the request is not valid JSON"),
    ([b'{"name": "\xff"}'], None, 2, "the request is not valid UTF-8 text"),
    ([b"[" * 50_000], None, 2, "nested too deeply"),
    ([b"-"], b'{"name": "\xff\xfe"}', 2, "the request is not valid JSON"),
    ([b'{"name": 5}'], None, 1, "BadRequest: greeter Greeter.SayHello: Expected `str`, got `int` - at `$.name`"),
    ([b'{"[/x]": 1}'], None, 1, "Object contains unknown field `[/x]`"),
    ([b'{"a\\nb": 1, "times": "x"}'], None, 1, "BadRequest: greeter Greeter.SayHello:"),
    ([b'{"name": "ok"}', b"-m", b"bad key=1"], None, 1, "BadRequest: metadata key 'bad key' is not allowed"),
]


async def run_calls(calls: list[tuple[list[bytes], bytes | None]]) -> list[tuple[int, str, str]]:
    """``micro call greeter Greeter.SayHello ARGV`` for each call, at once: (exit code, stdout, stderr)."""
    results: list[tuple[int, str, str]] = [(0, "", "")] * len(calls)

    async def one(i: int, argv: list[bytes], stdin: bytes | None) -> None:
        proc = await anyio.run_process([*MICRO, "call", "greeter", "Greeter.SayHello", *argv], input=stdin or b"",
                                       check=False, cwd=ROOT, env=os.environ.copy())
        results[i] = (proc.returncode, proc.stdout.decode(), proc.stderr.decode("utf-8", "replace"))

    async with anyio.create_task_group() as tg:
        for i, (argv, stdin) in enumerate(calls):
            tg.start_soon(one, i, argv, stdin)
    return results


def test_micro_call_with_bad_json_prints_one_line() -> None:
    """Real `micro call` runs: each bad request ends with exit code 1 or 2 and one line on stderr."""
    with Host(serving()) as host:
        results = host.run(run_calls([(argv, stdin) for argv, stdin, _, _ in BAD_CALLS]), guard=120)
        for (argv, _, code, needle), (returncode, stdout, stderr) in zip(BAD_CALLS, results, strict=True):
            assert (returncode, stdout) == (code, ""), (argv[0][:40], returncode, stderr)
            assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), (argv[0][:40], stderr)
            assert needle in stderr, (argv[0][:40], stderr)
        # and the service still answers a good one
        [(returncode, stdout, stderr)] = host.run(run_calls([([b'{"name": "ok"}'], None)]), guard=120)
        assert returncode == 0, stderr
        assert json.loads(stdout) == {"message": "ok", "index": 0}
