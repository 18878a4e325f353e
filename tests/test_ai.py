"""micro.ai: the message model, from_provider, and each provider end to end.

The anthropic and openai providers run through their real SDKs against local
fake servers (tests/fake_anthropic.py, tests/fake_openai.py) on loopback; every
test runs with MICRO_AI_OFFLINE=1, so nothing can reach a real API.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import anyio
import msgspec
import pytest
from fake_anthropic import FakeAnthropic, message, stream_error, text, tool_use
from fake_anthropic import error as anthropic_error
from fake_openai import FakeOpenAI, completion, tool_call
from fake_openai import error as openai_error

import micro.ai
from micro.ai import (
    INVALID_JSON,
    Done,
    Message,
    Model,
    Response,
    StreamEvent,
    TextBlock,
    TextDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    ToolUseDelta,
    ToolUseStart,
    Usage,
    from_provider,
    parse_tool_input,
    scripted,
)
from micro.ai.anthropic import AnthropicModel
from micro.ai.openai import OpenAIModel
from micro.errors import (
    AgentError,
    BadRequest,
    ConfigError,
    ResourceExhausted,
    Timeout,
    Unauthenticated,
    Unavailable,
)

KEY = "sk-test-0123456789-secret"
EPHEMERAL = {"type": "ephemeral"}
TOOLS = [
    ToolSpec(
        "task_Task_ListOverdue",
        "List overdue tasks.",
        {"type": "object", "properties": {"user_id": {"type": "string"}}},
    ),
    ToolSpec("project_Project_Get", "Get a project.", {"type": "object", "properties": {"id": {"type": "integer"}}}),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test in this file may reach a real model API."""
    monkeypatch.setenv("MICRO_AI_OFFLINE", "1")
    for var in (
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_AUTH_TOKEN",
        "OPENAI_BASE_URL",
        "MICRO_ANTHROPIC_MODEL",
        "MICRO_OPENAI_MODEL",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
async def anthropic_api() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as api:
        yield api


@pytest.fixture
async def claude(anthropic_api: FakeAnthropic) -> AsyncIterator[AnthropicModel]:
    async with AnthropicModel(api_key=KEY, base_url=anthropic_api.base_url) as model:
        yield model


@pytest.fixture
async def openai_api() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as api:
        yield api


@pytest.fixture
async def gpt(openai_api: FakeOpenAI) -> AsyncIterator[OpenAIModel]:
    async with OpenAIModel("gpt-fake", api_key=KEY, base_url=openai_api.base_url) as model:
        yield model


async def collect(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    with anyio.fail_after(10):  # a deadlock guard, not a timing assertion
        async with aclosing(stream) as events:
            return [event async for event in events]


def history_with_tools() -> list[Message]:
    return [
        Message.user("What is overdue for Alice?"),
        Message.assistant("Let me look.", ToolUseBlock("toolu_1", "task_Task_ListOverdue", {"user_id": "alice"})),
        Message.user(ToolResultBlock("toolu_1", "user not found", is_error=True)),
    ]


# --- the message model --------------------------------------------------------


def test_messages_round_trip_through_json() -> None:
    history = [*history_with_tools(), Message.assistant("Done.")]
    data = msgspec.json.encode(history)
    assert msgspec.json.decode(data, type=list[Message]) == history
    assert b'"type":"tool_use"' in data and b'"type":"tool_result"' in data


def test_response_helpers() -> None:
    rsp = Response(
        [TextBlock("Two "), ToolUseBlock("a", "x", {}), TextBlock("calls"), ToolUseBlock("b", "y", {"n": 1})],
        "tool_use",
        Usage(1, 2),
        "m",
    )
    assert rsp.text == "Two calls"
    assert [c.id for c in rsp.tool_uses] == ["a", "b"]
    assert rsp.message == Message("assistant", list(rsp.content))
    assert Message.user("hi").text == "hi"
    assert sum([Usage(1, 2, 3, 4), Usage(10, 20, 30, 40)], Usage()) == Usage(11, 22, 33, 44)


def test_parse_tool_input_never_raises() -> None:
    assert parse_tool_input('{"a": 1}') == {"a": 1}
    assert parse_tool_input("") == {}
    assert parse_tool_input('{"a": ') == {INVALID_JSON: '{"a": '}
    assert parse_tool_input("[1, 2]") == {INVALID_JSON: "[1, 2]"}
    assert ToolUseBlock("i", "t", parse_tool_input("nope")).invalid_json == "nope"
    assert ToolUseBlock("i", "t", {"a": 1}).invalid_json is None


def test_public_api_is_complete() -> None:
    # ruff's RUF022 keeps the order (constants first, then isort-style); here: no gaps, no repeats.
    assert len(set(micro.ai.__all__)) == len(micro.ai.__all__)
    exported = {
        n
        for n, v in vars(micro.ai).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith("micro.ai")
    }
    assert exported <= set(micro.ai.__all__) | {"annotations"}
    for name in micro.ai.__all__:
        assert hasattr(micro.ai, name), name


# --- from_provider ------------------------------------------------------------------


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        from_provider("gemini")
    assert "'gemini'" in str(err.value)
    for name in ("anthropic", "openai", "scripted"):
        assert name in str(err.value)


def test_missing_anthropic_key_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        from_provider("anthropic")


def test_missing_openai_key_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        from_provider("openai")


def test_openai_compatible_local_server_needs_no_key() -> None:
    model = from_provider("openai:llama3.2", base_url="http://localhost:11434/v1")
    assert isinstance(model, OpenAIModel)
    assert (model.name, model.model, model.max_tokens_field) == ("openai", "llama3.2", "max_tokens")


def test_offline_guard_refuses_real_apis(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="MICRO_AI_OFFLINE"):
        from_provider("anthropic", api_key=KEY)
    with pytest.raises(ConfigError, match="MICRO_AI_OFFLINE"):
        from_provider("openai", api_key=KEY, base_url="https://llm.example.com/v1")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://[::1]:9/")
    assert from_provider("anthropic", api_key=KEY).name == "anthropic"  # loopback is fine


async def test_offline_guard_also_holds_at_request_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICRO_AI_OFFLINE")
    model = AnthropicModel(api_key=KEY)  # constructing does no I/O
    assert model.base_url == "https://api.anthropic.com"
    monkeypatch.setenv("MICRO_AI_OFFLINE", "1")
    async with model:
        with pytest.raises(ConfigError, match="not loopback"):
            await model.generate([Message.user("hi")])
        with pytest.raises(ConfigError, match="not loopback"):
            await collect(model.stream([Message.user("hi")]))


def test_official_openai_uses_max_completion_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MICRO_AI_OFFLINE")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = from_provider("openai")
    assert isinstance(model, OpenAIModel)
    assert (model.model, model.max_tokens_field) == ("gpt-5.5", "max_completion_tokens")


def test_from_provider_options_and_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MICRO_ANTHROPIC_MODEL", "claude-haiku-4-5")
    model = from_provider("anthropic", max_tokens=100, timeout=5)
    assert isinstance(model, AnthropicModel)
    assert (model.model, model.max_tokens, model.base_url) == ("claude-haiku-4-5", 100, "http://127.0.0.1:9")
    assert from_provider(model) is model
    with pytest.raises(ConfigError, match="does not take"):
        from_provider("anthropic", temperature_typo=1)
    with pytest.raises(ConfigError, match="does not take"):
        from_provider("scripted", api_key=KEY)


def test_entry_point_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = importlib.metadata.EntryPoint("echo", "micro.ai.scripted:ScriptedModel", "micro.ai")

    def fake_entry_points(*, group: str, name: str | None = None) -> list[importlib.metadata.EntryPoint]:
        return [ep] if group == "micro.ai" and name in (None, "echo") else []

    monkeypatch.setattr("micro.backends.entry_points", fake_entry_points)  # the one scheme-table lookup
    assert isinstance(from_provider("echo"), scripted.ScriptedModel)
    assert "echo" in micro.ai.known_providers()
    with pytest.raises(ConfigError, match="echo"):
        from_provider("nope")


# --- anthropic through the real SDK -----------------------------------------------


async def test_anthropic_text(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    anthropic_api.reply(message(text("Hello, Alice."), usage={"input_tokens": 7, "output_tokens": 3}))
    rsp = await claude.generate([Message.user("Hi")])
    assert rsp == Response([TextBlock("Hello, Alice.")], "end_turn", Usage(7, 3), "claude-sonnet-5-5")
    [req] = anthropic_api.requests
    assert req.path == "/v1/messages"
    assert req.body["model"] == "claude-sonnet-5-5" and req.body["max_tokens"] == 4096
    assert req.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert "system" not in req.body and "tools" not in req.body
    assert KEY in req.headers.get("authorization", "") + req.headers.get("x-api-key", "")


async def test_anthropic_tool_use_and_history(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    anthropic_api.reply(message(tool_use("toolu_2", "task_Task_ListOverdue", {"user_id": "alice"})))
    rsp = await claude.generate(history_with_tools(), tools=TOOLS, system="You manage tasks.", max_tokens=99)
    assert rsp.stop_reason == "tool_use"
    assert rsp.tool_uses == [ToolUseBlock("toolu_2", "task_Task_ListOverdue", {"user_id": "alice"})]
    body = anthropic_api.requests[0].body
    assert body["max_tokens"] == 99
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "task_Task_ListOverdue", "input": {"user_id": "alice"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "user not found", "is_error": True}
            ],
        },
    ]


async def test_anthropic_parallel_tool_use(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    anthropic_api.reply(
        message(
            text("Checking both."),
            tool_use("toolu_a", "task_Task_ListOverdue", {"user_id": "alice"}),
            tool_use("toolu_b", "project_Project_Get", {"id": 7}),
        )
    )
    rsp = await claude.generate([Message.user("Alice's tasks and project 7?")], tools=TOOLS)
    assert rsp.text == "Checking both."
    assert [(c.id, c.name, c.input) for c in rsp.tool_uses] == [
        ("toolu_a", "task_Task_ListOverdue", {"user_id": "alice"}),
        ("toolu_b", "project_Project_Get", {"id": 7}),
    ]


async def test_anthropic_prompt_caching(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    usage = {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 40}
    anthropic_api.reply(message(text("ok"), usage=usage))
    rsp = await claude.generate([Message.user("Hi")], tools=TOOLS, system="You manage tasks.")
    body = anthropic_api.requests[0].body
    assert body["system"] == [{"type": "text", "text": "You manage tasks.", "cache_control": EPHEMERAL}]
    assert "cache_control" not in body["tools"][0]
    assert body["tools"][-1] == {
        "name": "project_Project_Get",
        "description": "Get a project.",
        "input_schema": TOOLS[1].input_schema,
        "cache_control": EPHEMERAL,
    }
    assert rsp.usage == Usage(5, 2, cache_read_tokens=900, cache_write_tokens=40)


async def test_anthropic_caching_can_be_off(anthropic_api: FakeAnthropic) -> None:
    anthropic_api.reply(message(text("ok")))
    async with AnthropicModel(api_key=KEY, base_url=anthropic_api.base_url, cache=False) as model:
        await model.generate([Message.user("Hi")], tools=TOOLS, system="S")
    body = anthropic_api.requests[0].body
    assert "cache_control" not in body["system"][0] and "cache_control" not in body["tools"][-1]


async def test_anthropic_stream_delivers_deltas_as_they_arrive(
    anthropic_api: FakeAnthropic, claude: AnthropicModel
) -> None:
    hold = anyio.Event()
    anthropic_api.reply(
        message(
            text("Alice has three overdue tasks."),
            tool_use("toolu_a", "task_Task_ListOverdue", {"user_id": "alice"}),
            tool_use("toolu_b", "project_Project_Get", {"id": 7}),
            hold=hold,
        )
    )
    events: list[StreamEvent] = []
    with anyio.fail_after(10):  # without real streaming this would deadlock
        async with aclosing(claude.stream([Message.user("Hi")], tools=TOOLS, system="S")) as stream:
            async for event in stream:
                if not events:
                    # The server holds the rest of the answer until we have this first delta.
                    assert event == TextDelta("Alice ") and not hold.is_set()
                    hold.set()
                events.append(event)
    *deltas, done = events
    assert isinstance(done, Done) and not any(isinstance(e, Done) for e in deltas)
    texts = [e.text for e in deltas if isinstance(e, TextDelta)]
    assert len(texts) == 5 and "".join(texts) == "Alice has three overdue tasks."
    starts = [e for e in deltas if isinstance(e, ToolUseStart)]
    assert starts == [ToolUseStart("toolu_a", "task_Task_ListOverdue"), ToolUseStart("toolu_b", "project_Project_Get")]
    assert deltas.index(starts[0]) > max(i for i, e in enumerate(deltas) if isinstance(e, TextDelta))
    json_a = "".join(e.partial_json for e in deltas if isinstance(e, ToolUseDelta) and e.id == "toolu_a")
    assert json_a == '{"user_id": "alice"}'
    rsp = done.response
    assert rsp.text == "Alice has three overdue tasks." and rsp.stop_reason == "tool_use"
    assert [c.input for c in rsp.tool_uses] == [{"user_id": "alice"}, {"id": 7}]
    assert rsp.usage == Usage(10, 5)
    assert anthropic_api.requests[0].body["stream"] is True
    assert anthropic_api.requests[0].body["system"][0]["cache_control"] == EPHEMERAL


async def test_anthropic_invalid_tool_json_is_kept_not_raised(
    anthropic_api: FakeAnthropic, claude: AnthropicModel
) -> None:
    anthropic_api.reply(message(tool_use("toolu_x", "project_Project_Get", raw='{"id": seven')))
    events = await collect(claude.stream([Message.user("Hi")], tools=TOOLS))
    done = events[-1]
    assert isinstance(done, Done)
    [call] = done.response.tool_uses
    assert call.input == {INVALID_JSON: '{"id": seven'}
    assert call.invalid_json == '{"id": seven'


async def test_anthropic_retries_429_then_succeeds(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    anthropic_api.reply(anthropic_error(429), message(text("ok")))
    rsp = await claude.generate([Message.user("Hi")])
    assert rsp.text == "ok"
    assert [r.headers.get("x-stainless-retry-count") for r in anthropic_api.requests] == ["0", "1"]


@pytest.mark.parametrize(("status", "word"), [(500, "api_error"), (529, "overloaded")])
async def test_anthropic_server_errors_after_retries(
    anthropic_api: FakeAnthropic, claude: AnthropicModel, status: int, word: str
) -> None:
    anthropic_api.reply(*[anthropic_error(status)] * 3)
    with pytest.raises(Unavailable) as err:
        await claude.generate([Message.user("Hi")])
    assert len(anthropic_api.requests) == 3  # the first try and max_retries=2
    assert word in err.value.message and "retry later" in err.value.message


async def test_anthropic_rate_limit_after_retries(anthropic_api: FakeAnthropic) -> None:
    anthropic_api.reply(anthropic_error(429), anthropic_error(429))
    async with AnthropicModel(api_key=KEY, base_url=anthropic_api.base_url, max_retries=1) as model:
        with pytest.raises(ResourceExhausted, match="Rate limited"):
            await model.generate([Message.user("Hi")])
    assert len(anthropic_api.requests) == 2


async def test_anthropic_bad_request_is_not_retried(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    anthropic_api.reply(anthropic_error(400, text="messages.0: empty content"), message(text("never sent")))
    with pytest.raises(BadRequest) as err:
        await claude.generate([Message.user("Hi")])
    assert len(anthropic_api.requests) == 1
    assert "messages.0: empty content" in err.value.message and "Not retried" in err.value.message
    assert "req_fake" in err.value.message  # the request id, for a support ticket


async def test_anthropic_auth_error_names_the_variable_never_the_key(
    anthropic_api: FakeAnthropic, claude: AnthropicModel
) -> None:
    anthropic_api.reply(anthropic_error(401, text=f"invalid x-api-key {KEY}"))
    with pytest.raises(Unauthenticated) as err:
        await claude.generate([Message.user("Hi")])
    assert "ANTHROPIC_API_KEY" in err.value.message
    assert KEY not in str(err.value) and KEY not in repr(claude)
    assert err.value.__cause__ is None and err.value.__suppress_context__


async def test_anthropic_overloaded_mid_stream(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    anthropic_api.reply(stream_error("overloaded_error", "Overloaded"))
    with pytest.raises(Unavailable, match="overloaded"):
        await collect(claude.stream([Message.user("Hi")]))


async def test_anthropic_timeout(anthropic_api: FakeAnthropic) -> None:
    hold = anyio.Event()  # never set: the server never finishes the stream
    anthropic_api.reply(message(text("a slow answer"), hold=hold))
    try:
        async with AnthropicModel(api_key=KEY, base_url=anthropic_api.base_url, max_retries=0) as model:
            with pytest.raises(Timeout):
                await collect(model.stream([Message.user("Hi")], timeout=0.2))
    finally:
        hold.set()


async def test_anthropic_env_configuration(anthropic_api: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_api.base_url)
    monkeypatch.setenv("MICRO_ANTHROPIC_MODEL", "claude-opus-4-8")
    anthropic_api.reply(message(text("ok")))
    async with from_provider("anthropic") as model:
        await model.generate([Message.user("Hi")])
        assert model.model == "claude-opus-4-8"
    req = anthropic_api.requests[0]
    assert req.body["model"] == "claude-opus-4-8"
    assert KEY in req.headers.get("authorization", "") + req.headers.get("x-api-key", "")


async def test_breaking_out_of_a_stream_releases_it(anthropic_api: FakeAnthropic, claude: AnthropicModel) -> None:
    hold = anyio.Event()
    anthropic_api.reply(message(text("a long answer that we stop reading"), hold=hold), message(text("next")))
    try:
        with anyio.fail_after(10):
            async with aclosing(claude.stream([Message.user("Hi")])) as stream:
                async for event in stream:
                    assert isinstance(event, TextDelta)
                    break
            assert (await claude.generate([Message.user("again")])).text == "next"
    finally:
        hold.set()


async def test_aclose_is_idempotent(anthropic_api: FakeAnthropic) -> None:
    model = AnthropicModel(api_key=KEY, base_url=anthropic_api.base_url)
    await model.aclose()
    await model.aclose()


# --- openai through the real SDK ----------------------------------------------------


async def test_openai_text_and_request_translation(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    openai_api.reply(completion("Alice has 3 overdue tasks."))
    rsp = await gpt.generate(history_with_tools(), tools=TOOLS, system="You manage tasks.", max_tokens=50)
    assert rsp == Response([TextBlock("Alice has 3 overdue tasks.")], "end_turn", Usage(12, 4), "gpt-fake")
    body = openai_api.requests[0].body
    assert body["messages"] == [
        {"role": "system", "content": "You manage tasks."},
        {"role": "user", "content": "What is overdue for Alice?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "task_Task_ListOverdue", "arguments": '{"user_id": "alice"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: user not found"},
    ]
    assert body["tools"][0] == {
        "type": "function",
        "function": {
            "name": "task_Task_ListOverdue",
            "description": "List overdue tasks.",
            "parameters": TOOLS[0].input_schema,
        },
    }
    assert body["max_tokens"] == 50 and "stream" not in body


async def test_openai_parallel_tool_calls(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    calls = [
        tool_call("call_a", "task_Task_ListOverdue", {"user_id": "alice"}),
        tool_call("call_b", "project_Project_Get", {"id": 7}),
    ]
    openai_api.reply(
        completion(
            tool_calls=calls,
            usage={"prompt_tokens": 100, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 64}},
        )
    )
    rsp = await gpt.generate([Message.user("Both?")], tools=TOOLS)
    assert rsp.stop_reason == "tool_use" and rsp.text == ""
    assert rsp.tool_uses == [
        ToolUseBlock("call_a", "task_Task_ListOverdue", {"user_id": "alice"}),
        ToolUseBlock("call_b", "project_Project_Get", {"id": 7}),
    ]
    assert rsp.usage == Usage(36, 9, cache_read_tokens=64)


async def test_openai_stream_assembles_tool_call_deltas(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    hold = anyio.Event()
    calls = [
        tool_call("call_a", "task_Task_ListOverdue", {"user_id": "alice"}),
        tool_call("call_b", "project_Project_Get", {"id": 7}),
    ]
    openai_api.reply(completion("Checking both now.", tool_calls=calls, hold=hold))
    events: list[StreamEvent] = []
    with anyio.fail_after(10):
        async with aclosing(gpt.stream([Message.user("Both?")], tools=TOOLS)) as stream:
            async for event in stream:
                if not events:
                    assert event == TextDelta("Checking ") and not hold.is_set()
                    hold.set()
                events.append(event)
    *deltas, done = events
    assert isinstance(done, Done)
    assert "".join(e.text for e in deltas if isinstance(e, TextDelta)) == "Checking both now."
    assert [e for e in deltas if isinstance(e, ToolUseStart)] == [
        ToolUseStart("call_a", "task_Task_ListOverdue"),
        ToolUseStart("call_b", "project_Project_Get"),
    ]
    assert len([e for e in deltas if isinstance(e, ToolUseDelta) and e.id == "call_b"]) > 1
    assert done.response.tool_uses == [
        ToolUseBlock("call_a", "task_Task_ListOverdue", {"user_id": "alice"}),
        ToolUseBlock("call_b", "project_Project_Get", {"id": 7}),
    ]
    assert done.response.stop_reason == "tool_use" and done.response.usage == Usage(12, 4)
    assert openai_api.requests[0].body["stream_options"] == {"include_usage": True}


async def test_openai_invalid_tool_json_is_kept(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    bad = [tool_call("call_x", "project_Project_Get", raw='{"id": seven')]
    openai_api.reply(completion(tool_calls=bad), completion(tool_calls=bad))
    rsp = await gpt.generate([Message.user("Hi")], tools=TOOLS)
    assert rsp.tool_uses[0].invalid_json == '{"id": seven'
    done = (await collect(gpt.stream([Message.user("Hi")], tools=TOOLS)))[-1]
    assert isinstance(done, Done) and done.response.tool_uses[0].input == {INVALID_JSON: '{"id": seven'}


async def test_openai_finish_reasons(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    openai_api.reply(completion("cut", finish_reason="length"), completion("no", finish_reason="content_filter"))
    assert (await gpt.generate([Message.user("a")])).stop_reason == "max_tokens"
    assert (await gpt.generate([Message.user("b")])).stop_reason == "refusal"


async def test_openai_retries_429_then_succeeds(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    openai_api.reply(openai_error(429), completion("ok"))
    assert (await gpt.generate([Message.user("Hi")])).text == "ok"
    assert len(openai_api.requests) == 2


async def test_openai_server_error_after_retries(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    openai_api.reply(*[openai_error(500)] * 3)
    with pytest.raises(Unavailable, match="retry later"):
        await gpt.generate([Message.user("Hi")])
    assert len(openai_api.requests) == 3


async def test_openai_bad_request_is_not_retried(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    openai_api.reply(openai_error(400, text="'tools' is too long"), completion("never sent"))
    with pytest.raises(BadRequest, match="'tools' is too long"):
        await collect(gpt.stream([Message.user("Hi")]))
    assert len(openai_api.requests) == 1


async def test_openai_auth_error(openai_api: FakeOpenAI, gpt: OpenAIModel) -> None:
    openai_api.reply(openai_error(401, text=f"Incorrect API key provided: {KEY}"))
    with pytest.raises(Unauthenticated) as err:
        await gpt.generate([Message.user("Hi")])
    assert "OPENAI_API_KEY" in err.value.message and KEY not in err.value.message
    assert KEY not in repr(gpt)


async def test_default_stream_for_a_generate_only_provider() -> None:
    class Fixed(Model):
        name, model = "fixed", "fixed-1"

        async def generate(
            self,
            messages: Sequence[Message],
            *,
            tools: Sequence[ToolSpec] = (),
            system: str | None = None,
            max_tokens: int | None = None,
            timeout: float | None = None,
        ) -> Response:
            return Response([TextBlock("hi"), ToolUseBlock("c", "t", {})], "tool_use", Usage(), self.model)

    async with Fixed() as model:
        events = await collect(model.stream([Message.user("x")]))
    assert events[:2] == [TextDelta("hi"), ToolUseStart("c", "t")]
    assert isinstance(events[2], Done) and events[2].response.model == "fixed-1"
    assert repr(model) == "Fixed(provider='fixed', model='fixed-1')"


# --- scripted -------------------------------------------------------------------------


async def test_scripted_turns_and_recorded_calls() -> None:
    model = scripted.turns(
        scripted.call("task_Task_ListOverdue", user_id="alice"),
        scripted.reply("Alice has 3 overdue tasks"),
    )
    assert (model.name, model.model, model.remaining) == ("scripted", "scripted", 2)
    history = [Message.user("What is overdue for Alice?")]
    first = await model.generate(history, tools=TOOLS, system="You manage tasks.")
    assert first.stop_reason == "tool_use"
    assert first.tool_uses == [ToolUseBlock("call_1", "task_Task_ListOverdue", {"user_id": "alice"})]
    history += [first.message, Message.user(ToolResultBlock("call_1", "3 tasks"))]
    second = await model.generate(history, tools=TOOLS)
    assert (second.text, second.stop_reason, second.model) == ("Alice has 3 overdue tasks", "end_turn", "scripted")
    assert model.remaining == 0
    assert model.calls[0].system == "You manage tasks." and model.calls[0].tool_names == [t.name for t in TOOLS]
    assert model.calls[0].messages == [Message.user("What is overdue for Alice?")]  # a copy, not the live list
    assert model.calls[1].messages[-1].content == [ToolResultBlock("call_1", "3 tasks")]


async def test_scripted_parallel_calls_in_one_turn() -> None:
    model = scripted.turns(
        scripted.turn("Checking both.", scripted.call("a", {"id": 1}), scripted.call("b", n=2)),
        "done",
    )
    rsp = await model.generate([Message.user("go")])
    assert rsp.text == "Checking both."
    assert [(c.id, c.name, c.input) for c in rsp.tool_uses] == [("call_1", "a", {"id": 1}), ("call_2", "b", {"n": 2})]
    assert (await model.generate([Message.user("go")])).text == "done"


async def test_scripted_exhaustion_is_an_agent_error() -> None:
    model = scripted.turns("only one")
    await model.generate([Message.user("1")])
    with pytest.raises(AgentError, match="no more turns"):
        await model.generate([Message.user("2")])


async def test_scripted_function_sync_and_async() -> None:
    def sync_fn(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if messages[-1].content and isinstance(messages[-1].content[0], ToolResultBlock):
            return f"result was {messages[-1].content[0].content}"
        return scripted.call(tools[0].name, user_id="bob")

    async def async_fn(messages: list[Message], tools: list[ToolSpec]) -> Response:
        return Response([TextBlock(f"{len(messages)} messages")], "end_turn", Usage(), "mine")

    model = scripted.function(sync_fn)
    rsp = await model.generate([Message.user("hi")], tools=TOOLS)
    assert rsp.tool_uses[0].input == {"user_id": "bob"}
    rsp = await model.generate([Message.user(ToolResultBlock(rsp.tool_uses[0].id, "ok"))], tools=TOOLS)
    assert rsp.text == "result was ok" and model.remaining is None
    assert (await scripted.function(async_fn).generate([Message.user("a"), Message.user("b")])).text == "2 messages"


async def test_scripted_concurrent_calls_each_get_their_own_answer() -> None:
    model = scripted.function(lambda messages, tools: f"echo {messages[-1].text}", delay=0.01)
    results: dict[int, str] = {}

    async def ask(i: int) -> None:
        results[i] = (await model.generate([Message.user(str(i))])).text

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(ask, i)
    assert results == {i: f"echo {i}" for i in range(20)}
    assert len(model.calls) == 20


async def test_scripted_stream() -> None:
    model = scripted.turns(scripted.turn("Looking it up for you.", scripted.call("a", x=1), scripted.call("b")))
    events = await collect(model.stream([Message.user("go")]))
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(texts) > 1 and "".join(texts) == "Looking it up for you."
    assert [e for e in events if isinstance(e, ToolUseStart)] == [
        ToolUseStart("call_1", "a"),
        ToolUseStart("call_2", "b"),
    ]
    assert isinstance(events[-1], Done) and len(events[-1].response.tool_uses) == 2


async def test_scripted_timeout_and_default_echo() -> None:
    with pytest.raises(Timeout):
        await scripted.turns("late", delay=30).generate([Message.user("hi")], timeout=0.01)
    labelled = scripted.ScriptedModel(["hi"], model="scripted demo (set ANTHROPIC_API_KEY for Claude)")
    assert (await labelled.generate([Message.user("x")])).model.startswith("scripted demo")
    echo = from_provider("scripted")
    assert isinstance(echo, Model) and echo.model == "scripted"
    assert "scripted model" in (await echo.generate([Message.user("ping")])).text


async def test_scripted_rejects_bad_script_items() -> None:
    model = scripted.ScriptedModel([42])  # type: ignore[list-item]
    with pytest.raises(AgentError, match="Turn, Response or str"):
        await model.generate([Message.user("x")])
