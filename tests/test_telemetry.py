"""OpenTelemetry: one connected trace across in-process and network calls and the broker."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import anyio
import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import micro
from micro import telemetry
from micro.registry.memory import MemoryRegistry


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    telemetry.enable(provider)
    yield exp
    telemetry.disable()


class Q(msgspec.Struct):
    n: int = 0


class Back:
    async def Get(self, req: Q) -> Q:
        """The far end."""
        return Q(req.n + 1)


class Front:
    def __init__(self, svc: micro.Service) -> None:
        self.svc = svc

    async def Get(self, req: Q) -> Q:
        """Calls the back service."""
        return await self.svc.client.call("back", "Back.Get", req, response_type=Q)


async def test_one_trace_across_services_and_processes(exporter: InMemorySpanExporter) -> None:
    registry = MemoryRegistry()
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt1, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt2:
        front = micro.New("front", runtime=rt1)
        front.handle(Front(front))
        back = micro.New("back", runtime=rt2)  # another runtime: the front reaches it over gRPC
        back.handle(Back())
        async with front, back:
            assert await rt1.client.call("front", "Front.Get", {"n": 1}) == {"n": 2}
    spans = {s.name + ":" + s.kind.name: s for s in exporter.get_finished_spans()}
    chain = ["front/Front.Get:CLIENT", "front/Front.Get:SERVER", "back/Back.Get:CLIENT", "back/Back.Get:SERVER"]
    assert set(chain) <= set(spans)
    trace_ids = {spans[k].context.trace_id for k in chain}
    assert len(trace_ids) == 1
    for parent, child in itertools.pairwise(chain):
        assert spans[child].parent is not None and spans[child].parent.span_id == spans[parent].context.span_id
    assert spans["back/Back.Get:SERVER"].attributes["rpc.method"] == "Get"


async def test_publish_and_consume_share_the_trace(exporter: InMemorySpanExporter) -> None:
    got = anyio.Event()

    async def on_event(data: dict[str, int]) -> None:
        got.set()

    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        svc = micro.New("listener", runtime=rt)
        svc.subscribe("events.x", on_event)
        async with svc:
            await rt.client.publish("events.x", {"n": 1})
            with anyio.fail_after(10):
                await got.wait()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    produced, consumed = spans["events.x publish"], spans["events.x process"]
    assert consumed.context.trace_id == produced.context.trace_id
    assert consumed.parent is not None and consumed.parent.span_id == produced.context.span_id


async def test_no_spans_and_no_wrappers_when_disabled() -> None:
    telemetry.disable()
    exp = InMemorySpanExporter()
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        svc = micro.New("back", runtime=rt)
        svc.handle(Back())
        async with svc:
            assert await rt.client.call("back", "Back.Get", {}) == {"n": 1}
            ep = svc.endpoints["Back.Get"]
            assert ep.invoke == ep._call  # no tracing layer on the fast path
    assert exp.get_finished_spans() == ()


async def test_a_chat_that_calls_a_tool_that_calls_another_service_is_one_trace(
        exporter: InMemorySpanExporter) -> None:
    from micro.ai import scripted

    registry = MemoryRegistry()
    model = scripted.turns(scripted.call("front_Front_Get", n=1), scripted.reply("the answer is 2"))
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt1, \
            micro.Runtime(registry=registry, store="memory://", broker="memory://") as rt2:
        agent = micro.NewAgent("helper", services=["front"], provider=model, runtime=rt1)
        front = micro.New("front", runtime=rt2)  # the agent reaches it over gRPC
        front.handle(Front(front))
        back = micro.New("back", runtime=rt2)
        back.handle(Back())
        async with agent, front, back:
            rsp = await rt2.client.call("helper", "Agent.Chat", {"message": "what is 1 + 1?"})
    assert rsp["reply"] == "the answer is 2"
    spans = {s.name + ":" + s.kind.name: s for s in exporter.get_finished_spans()}
    chain = ["helper/Agent.Chat:CLIENT", "helper/Agent.Chat:SERVER", "invoke_agent helper:INTERNAL",
             "execute_tool front_Front_Get:INTERNAL", "front/Front.Get:CLIENT", "front/Front.Get:SERVER",
             "back/Back.Get:CLIENT", "back/Back.Get:SERVER"]
    assert set(chain) <= set(spans), sorted(spans)
    for parent, child in itertools.pairwise(chain):
        assert spans[child].parent is not None and spans[child].parent.span_id == spans[parent].context.span_id, \
            f"{child} is not a child of {parent}"
    model_span = spans["chat scripted:CLIENT"]
    assert model_span.parent is not None and model_span.parent.span_id == spans[chain[2]].context.span_id
    assert model_span.attributes["gen_ai.operation.name"] == "chat"
    assert model_span.attributes["gen_ai.provider.name"] == "scripted"
    assert spans[chain[2]].attributes["micro.run_id"] == rsp["run_id"]
    assert len({spans[k].context.trace_id for k in chain}) == 1
    # prompts and tool arguments stay out unless record_content=True
    assert not any("gen_ai.tool.call.arguments" in s.attributes or "gen_ai.output.messages" in s.attributes
                   for s in exporter.get_finished_spans())
