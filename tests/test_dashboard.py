"""The dashboard without a browser (issue 20): forms from schemas, the timeline's layout, escaping, CSRF,
the login cookie, deny-with-reason through ``Agent.Resume``, and mounting under a path.

In-process: the ASGI app on a memory runtime, driven by ``httpx.ASGITransport``. The browser tests
(tests/test_dashboard_browser.py) drive the same pages in Chromium against ``micro run``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.dashboard import app as dashboard
from micro.dashboard import forms, nodes, timeline
from micro.dashboard.pages import REFRESH
from micro.errors import BadRequest
from micro.gateway.http import LOOPBACK_HOSTS
from micro.gateway.http import app as gateway

TOKEN = "dashboard-t0ken"
MARKUP = '<script>alert("x")</script>'


class Color(msgspec.Struct):
    name: str


class Paint(msgspec.Struct):
    """What to paint."""

    wall: str
    coats: int = 1
    finish: str | None = None
    glossy: bool = False
    color: Color | None = None
    ratio: float = 0.5


class Painted(msgspec.Struct):
    note: str


class Painter:
    async def Paint(self, req: Paint) -> Painted:
        """Paints a wall. <b>Carefully</b>."""
        return Painted(note=f"{req.wall} painted {req.coats}x {MARKUP}")


def _brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return f"The painter said: {results[0].content}"
    return scripted.turn("Painting. ", scripted.call("painter_Painter_Paint", wall=messages[-1].text))


def _pair(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return " | ".join(r.content for r in results)
    return scripted.turn("Painting two walls. ", scripted.call("painter_Painter_Paint", wall="north"),
                         scripted.call("painter_Painter_Paint", wall="south"))


def _asker(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return f"Painting the {results[0].content} wall."
    return scripted.turn("", scripted.call("request_input", question=f"Which wall? {MARKUP}"))


@pytest.fixture
async def runtime() -> AsyncIterator[micro.Runtime]:
    async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
        painter = micro.Service("painter", runtime=rt, metadata={"description": f"paints {MARKUP}"})
        painter.handle(Painter())
        helper = micro.Agent("helper", services=["painter"], prompt="You paint.", runtime=rt,
                             provider=scripted.function(_brain), needs_approval=["painter_Painter_Paint"])
        asker = micro.Agent("asker", services=[], prompt="You ask.", runtime=rt, provider=scripted.function(_asker))
        pair = micro.Agent("pair", services=["painter"], prompt="You paint.", runtime=rt,
                           provider=scripted.function(_pair), needs_approval=["painter_Painter_Paint"])
        async with painter, helper, asker, pair:
            yield rt


def _client(asgi: Any, base: str = "http://127.0.0.1:8080") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(asgi), base_url=base, headers={"Accept": "text/html"})


def _csrf(html: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert found is not None
    return found.group(1)


def test_form_fields_follow_the_request_schema() -> None:
    schema = micro.codec.codec_for(Paint).schema()
    fields = {f.name: f for f in forms.fields(schema)}
    assert list(fields) == ["wall", "coats", "finish", "glossy", "color", "ratio"]
    assert (fields["wall"].kind, fields["wall"].required) == ("string", True)
    assert (fields["coats"].kind, fields["coats"].required, fields["coats"].default) == ("integer", False, "1")
    assert fields["finish"].kind == "string"  # Optional[str]: a text field
    assert fields["glossy"].kind == "boolean" and fields["color"].kind == "json" and fields["ratio"].kind == "number"
    got = forms.values(schema, {"wall": "north", "coats": "2", "glossy": "true", "color": '{"name": "red"}',
                                "ratio": "", "finish": ""}, where="painter Painter.Paint")
    assert got == {"wall": "north", "coats": 2, "glossy": True, "color": {"name": "red"}}
    assert msgspec.convert(got, Paint) == Paint("north", 2, None, True, Color("red"))
    with pytest.raises(BadRequest, match=r"painter Painter.Paint: field 'coats' must be a whole number, not 'two'"):
        forms.values(schema, {"wall": "n", "coats": "two"}, where="painter Painter.Paint")
    with pytest.raises(BadRequest, match=r"field 'color' must be JSON"):
        forms.values(schema, {"wall": "n", "color": "{red"}, where="w")
    with pytest.raises(BadRequest, match=r"field 'wall' is required"):
        forms.values({"properties": {"wall": {"type": "integer"}}, "required": ["wall"]}, {}, where="w")
    enum = {"properties": {"size": {"enum": ["s", "m"]}}, "required": ["size"]}
    assert forms.fields(enum)[0].choices == ("s", "m")
    with pytest.raises(BadRequest, match=r"field 'size' must be one of s, m, not 'xl'"):
        forms.values(enum, {"size": "xl"}, where="w")


def test_the_timeline_puts_overlapping_calls_side_by_side_and_the_model_in_the_gaps() -> None:
    run = {"started": 100.0, "finished": 100.1, "tool_calls": [
        {"name": "a", "input": {}, "started": 100.01, "seconds": 0.02, "state": "done"},
        {"name": "b", "input": {}, "started": 100.015, "seconds": 0.01, "state": "done", "is_error": True},
        {"name": "c", "input": {}, "started": 100.05, "seconds": 0.01, "state": "pending"},
    ]}
    bars = timeline.agent_bars(run)
    tools = {b.label: (b.lane, b.kind, round(b.start, 3), round(b.seconds, 3)) for b in bars if b.lane}
    # c waits for approval: its bar runs to the end of what is known of the run
    assert tools == {"a": (1, "tool", 0.01, 0.02), "b": (2, "error", 0.015, 0.01), "c": (1, "pending", 0.05, 0.05)}
    model = [(round(b.start, 3), round(b.seconds, 3)) for b in bars if b.lane == 0]
    assert model == [(0.0, 0.01), (0.03, 0.02)]  # before the first call; between the turns' calls
    drawn = timeline.layout(bars)
    assert drawn.lanes == ["model", "tools 1", "tools 2"]
    assert [t for _, t in drawn.ticks] == ["0 ms", "20 ms", "40 ms", "60 ms", "80 ms", "100 ms"]
    by_label = {d.label: d for d in drawn.bars}
    assert by_label["a"].x < by_label["b"].x < by_label["a"].x + by_label["a"].w  # side by side, overlapping
    assert by_label["a"].y != by_label["b"].y
    flow = timeline.flow_bars({"started": 10.0, "finished": 10.5, "trace": {
        "lead": {"kind": "await", "status": "completed", "started": 10.0, "seconds": 0.1},
        "closed": {"kind": "call", "status": "failed", "started": 10.2, "seconds": 0.3, "error": "no"}}})
    assert [(b.lane, b.label, b.kind) for b in flow] == [(0, "lead", "step"), (1, "closed", "failed")]


def test_the_timeline_draws_a_wait_for_a_person_as_waiting_not_as_a_model_turn() -> None:
    # the call paused at 101 for an approval that came an hour later; it then ran for half a second
    run = {"started": 100.0, "finished": 3702.0, "tool_calls": [
        {"name": "a", "input": {}, "paused": 101.0, "started": 3701.0, "seconds": 0.5, "state": "done"}]}
    bars = [(b.lane, b.kind, b.label, round(b.start, 3), round(b.seconds, 3)) for b in timeline.agent_bars(run)]
    assert sorted(bars) == [(0, "model", "model turn 1", 0.0, 1.0), (0, "model", "model turn 2", 3601.5, 0.5),
                            (0, "waiting", "waiting for a person", 1.0, 3600.0), (1, "tool", "a", 3601.0, 0.5)]


def test_the_timeline_draws_recorded_model_turns_with_their_tokens_not_the_gaps() -> None:
    # the first turn took 8 ms of the 10 before the call (the rest was the loop's own time); the second failed
    run = {"started": 100.0, "finished": 100.1, "turns": [
        {"started": 100.001, "seconds": 0.008, "input_tokens": 120, "output_tokens": 30},
        {"started": 100.04, "seconds": 0.05, "error": "Timeout: the model did not answer"}],
        "tool_calls": [{"name": "a", "input": {}, "started": 100.01, "seconds": 0.02, "state": "done"}]}
    bars = [(b.lane, b.kind, b.label, round(b.start, 3), round(b.seconds, 3)) for b in timeline.agent_bars(run)]
    assert sorted(bars) == [(0, "error", "model turn 2 failed", 0.04, 0.05),
                            (0, "model", "model turn 1 · 120 in / 30 out", 0.001, 0.008),
                            (1, "tool", "a", 0.01, 0.02)]
    titles = [b.title for b in timeline.agent_bars(run) if b.lane == 0]
    assert titles == ["model turn 1: 8.0 ms, 120 in / 30 out tokens",
                      "model turn 2: 50.0 ms, failed: Timeout: the model did not answer"]
    # the axis spans the whole run (the loop's own time after the last bar too); a label that would run past
    # the right edge ends at its bar's end instead
    drawn = timeline.layout(timeline.agent_bars(run), total=0.2)
    assert drawn.total == 0.2 and [t for _, t in drawn.ticks][-1] == "200 ms"
    late = timeline.layout([timeline.Bar(0, 0.0, 0.01, "early", "model", ""),
                            timeline.Bar(0, 0.9, 0.1, "a label far too long to fit after its bar", "model", "")])
    (early, far) = late.bars
    assert (early.anchor, early.label_x) == ("start", early.x + 4)
    assert (far.anchor, far.label_x) == ("end", far.x + far.w - 4)


def test_a_run_spanning_the_upgrade_to_recorded_turns_infers_its_earlier_turns_from_the_gaps() -> None:
    # its first turns ran before turns were recorded (one call from then); the last one was recorded
    run = {"started": 100.0, "finished": 100.1, "turns": [
        {"started": 100.05, "seconds": 0.04, "input_tokens": 9, "output_tokens": 3}],
        "tool_calls": [{"name": "a", "input": {}, "started": 100.01, "seconds": 0.02, "state": "done"}]}
    bars = [(b.lane, b.label, round(b.start, 3), round(b.seconds, 3)) for b in timeline.agent_bars(run)]
    assert sorted(bars) == [(0, "model turn 1", 0.0, 0.01), (0, "model turn 2", 0.03, 0.02),
                            (0, "model turn 3 · 9 in / 3 out", 0.05, 0.04), (1, "a", 0.01, 0.02)]
    assert "(inferred: before turns were recorded)" in timeline.agent_bars(run)[1].title


async def test_pages_escape_what_services_and_runs_hold(runtime: micro.Runtime) -> None:
    async with _client(dashboard(runtime)) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "micro_csrf_8080=" in page.headers["set-cookie"]
        # scripts only from the server's files, no framing, and htmx evaluates no strings as code
        assert page.headers["content-security-policy"] == "script-src 'self'; frame-ancestors 'none'"
        assert """<meta name="htmx-config" content='{"allowEval": false, "allowScriptTags": false}'>""" in page.text
        assert MARKUP not in page.text and "paints &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page.text
        page = await http.get("/services/painter")
        assert "<b>Carefully</b>" not in page.text and "&lt;b&gt;Carefully&lt;/b&gt;" in page.text
        assert re.search(r'<input type="text" id="f-Painter-Paint-wall" name="wall" value="" +required>', page.text)
        assert '<label for="f-Painter-Paint-wall">' in page.text
        rsp = await http.post("/ui/call/painter/Painter.Paint", data={"wall": MARKUP, "csrf": _csrf(page.text)})
        assert rsp.status_code == 200 and "<script>" not in rsp.text and "&lt;script&gt;" in rsp.text
        rsp = await http.post("/ui/call/painter/Painter.Paint",
                              data={"wall": "w", "coats": "two", "csrf": _csrf(page.text)})
        assert "field &#39;coats&#39; must be a whole number" in rsp.text and "INVALID_ARGUMENT" in rsp.text


async def test_actions_need_the_pages_csrf_token(runtime: micro.Runtime) -> None:
    async with _client(dashboard(runtime)) as http:
        token = _csrf((await http.get("/services/painter")).text)
        for data, headers in (({"wall": "w"}, {}), ({"wall": "w", "csrf": "x" * 43}, {}),
                              ({"wall": "w"}, {"X-CSRF-Token": token[:-1]})):
            rsp = await http.post("/ui/call/painter/Painter.Paint", data=data, headers=headers)
            # a fragment htmx swaps in (it shows only 2xx answers): the refusal, and no call made
            assert rsp.status_code == 200 and "CSRF token is missing or stale" in rsp.text
            assert "PERMISSION_DENIED" in rsp.text and "painted" not in rsp.text
        rsp = await http.post("/ui/call/painter/Painter.Paint", data={"wall": "w"}, headers={"X-CSRF-Token": token})
        assert rsp.status_code == 200 and "w painted 1x" in rsp.text
        http.cookies.clear()  # a cookie-less POST (another site's form) carries the field but not the cookie
        rsp = await http.post("/ui/call/painter/Painter.Paint", data={"wall": "w", "csrf": token})
        assert "PERMISSION_DENIED" in rsp.text and "painted" not in rsp.text
        rsp = await http.post("/ui/call/painter/Painter.Paint", data={"wall": "w", "csrf": token},
                              headers={"Origin": "https://evil.example"})
        assert rsp.status_code == 403 and "cross-origin request" in rsp.text

    # the CSRF cookie is this port's: another port's dashboard on the same host neither reads nor accepts it.
    # A browser sends a host's cookies to every port of it: the cookie exactly as 8080 set it goes to 9090 too
    async with _client(dashboard(runtime)) as http:
        page = await http.get("/services/painter")
        name, value = page.headers["set-cookie"].split(";")[0].split("=", 1)
        token = _csrf(page.text)
    async with _client(dashboard(runtime), base="http://127.0.0.1:9090") as other:
        other.cookies.set(name, value)
        rsp = await other.post("/ui/call/painter/Painter.Paint", data={"wall": "w", "csrf": token})
        assert "PERMISSION_DENIED" in rsp.text and "painted" not in rsp.text  # one cookie for all ports: painted
        assert (await other.get("/")).headers["set-cookie"].startswith("micro_csrf_9090=")
    assert name == "micro_csrf_8080" and value == token


async def test_a_denial_with_a_reason_reaches_the_model(runtime: micro.Runtime) -> None:
    rsp = await runtime.client.call("helper", "Agent.Chat", {"message": "north"})
    assert rsp["status"] == "paused"
    run_id = rsp["run_id"]
    async with _client(dashboard(runtime)) as http:
        page = await http.get("/agents/helper")
        assert f'data-run="{run_id}"' in page.text and 'value="deny"' in page.text
        rsp = await http.post(f"/ui/agents/helper/runs/{run_id}/resume",
                              data={"action": "deny", "reason": "not today", "csrf": _csrf(page.text)})
        assert rsp.status_code == 303 and rsp.headers["location"] == f"/agents/helper/runs/{run_id}"
        run = (await runtime.client.call("helper", "AgentInfo.Run", {"id": run_id}))["run"]
        assert run["status"] == "completed" and "not today" in run["reply"]
        assert run["tool_calls"][0]["is_error"] is True
        page = await http.get(f"/agents/helper/runs/{run_id}")
        assert 'id="run-status">completed<' in page.text and 'class="bar error"' in page.text
        assert 'class="bar waiting"' in page.text  # the time it waited for the decision (recorded: `paused`)
        # deciding again: the engine's answer, on the page, nothing changed
        again = await http.post(f"/ui/agents/helper/runs/{run_id}/resume",
                                data={"action": "approve", "csrf": _csrf(page.text)})
        assert again.status_code == 400 and run_id in again.text and "completed" in again.text
        assert (await runtime.client.call("helper", "AgentInfo.Run", {"id": run_id}))["run"] == run


async def test_each_call_of_a_paused_run_is_approved_or_denied_on_its_own(runtime: micro.Runtime) -> None:
    rsp = await runtime.client.call("pair", "Agent.Chat", {"message": "paint"})
    assert rsp["status"] == "paused" and len(rsp["pending"]) == 2
    run_id = rsp["run_id"]
    north, south = (p["call_id"] for p in rsp["pending"])
    async with _client(dashboard(runtime)) as http:
        page = await http.get(f"/agents/pair/runs/{run_id}")
        # a form per call (its call id), and one for both
        assert page.text.count('class="decide one"') == 2 and page.text.count('class="decide all"') == 1
        assert f'name="call_id" value="{north}"' in page.text and f'name="call_id" value="{south}"' in page.text
        rsp = await http.post(f"/ui/agents/pair/runs/{run_id}/resume",
                              data={"action": "approve", "call_id": north, "csrf": _csrf(page.text)})
        assert rsp.status_code == 303
        run = (await runtime.client.call("pair", "AgentInfo.Run", {"id": run_id}))["run"]
        assert run["status"] == "paused"  # still waits for the other call; the first decision is kept
        assert [(p["call_id"], p["decided"], p["approved"]) for p in run["pending"]] == [
            (north, True, True), (south, False, False)]
        page = await http.get(f"/agents/pair/runs/{run_id}")
        assert "decided: approved; waits for the other calls" in page.text
        assert page.text.count('class="decide one"') == 1 and 'class="decide all"' not in page.text
        rsp = await http.post(f"/ui/agents/pair/runs/{run_id}/resume",
                              data={"action": "deny", "call_id": south, "reason": "too wet", "csrf": _csrf(page.text)})
        assert rsp.status_code == 303
    run = (await runtime.client.call("pair", "AgentInfo.Run", {"id": run_id}))["run"]
    assert run["status"] == "completed"
    assert run["reply"].startswith('{"note":"north painted 1x') and "not approved by a person: too wet" in run["reply"]


async def test_the_decide_all_form_names_the_undecided_calls_and_decides_them(runtime: micro.Runtime) -> None:
    rsp = await runtime.client.call("pair", "Agent.Chat", {"message": "paint"})
    run_id = rsp["run_id"]
    north, south = (p["call_id"] for p in rsp["pending"])
    async with _client(dashboard(runtime)) as http:
        page = await http.get(f"/agents/pair/runs/{run_id}")
        calls = re.search(r"name=\"calls\" value='([^']+)'", page.text)  # tojson: in single quotes
        assert calls is not None and msgspec.json.decode(calls.group(1)) == [north, south]
        rsp = await http.post(f"/ui/agents/pair/runs/{run_id}/resume",
                              data={"action": "deny", "calls": f'["{north}", "{south}"]', "reason": "no paint",
                                    "csrf": _csrf(page.text)})
        assert rsp.status_code == 303
        bad = await http.post(f"/ui/agents/pair/runs/{run_id}/resume",
                              data={"action": "deny", "calls": "north,south", "csrf": _csrf(page.text)})
        assert bad.status_code == 400 and "not a JSON list of call ids" in bad.text
    run = (await runtime.client.call("pair", "AgentInfo.Run", {"id": run_id}))["run"]
    assert run["status"] == "completed" and run["reply"].count("not approved by a person: no paint") == 2


async def test_a_stale_page_cannot_reverse_a_decision_already_recorded(runtime: micro.Runtime) -> None:
    rsp = await runtime.client.call("pair", "Agent.Chat", {"message": "paint"})
    run_id = rsp["run_id"]
    north, south = (p["call_id"] for p in rsp["pending"])
    resume = f"/ui/agents/pair/runs/{run_id}/resume"
    async with _client(dashboard(runtime)) as a, _client(dashboard(runtime)) as b:
        page_a = await a.get(f"/agents/pair/runs/{run_id}")
        page_b = await b.get(f"/agents/pair/runs/{run_id}")  # a second tab, opened at the same time
        pause = re.search(r'name="pause" value="([^"]+)"', page_b.text)
        assert pause is not None
        ok = await a.post(resume, data={"action": "approve", "call_id": north, "pause": pause.group(1),
                                        "csrf": _csrf(page_a.text)})
        assert ok.status_code == 303
        again = await a.post(resume, data={"action": "approve", "call_id": north, "pause": pause.group(1),
                                           "csrf": _csrf(page_a.text)})  # a double click: accepted quietly
        assert again.status_code == 303
        stale = await b.post(resume, data={"action": "deny", "call_id": north, "reason": "B says no",
                                           "pause": pause.group(1), "csrf": _csrf(page_b.text)})
        assert stale.status_code == 400
        assert f"run {run_id}: call {north} (painter_Painter_Paint) was already approved" in stale.text
        stale_all = await b.post(resume, data={"action": "deny", "calls": f'["{north}", "{south}"]', "reason": "no",
                                               "pause": pause.group(1), "csrf": _csrf(page_b.text)})
        assert stale_all.status_code == 400 and "was already approved" in stale_all.text
    run = (await runtime.client.call("pair", "AgentInfo.Run", {"id": run_id}))["run"]
    assert run["status"] == "paused"  # nothing of B's was recorded
    assert [(p["call_id"], p["decided"], p["approved"]) for p in run["pending"]] == [
        (north, True, True), (south, False, False)]


def _twice(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    done = sum(isinstance(b, ToolResultBlock) for m in messages for b in m.content)
    if done >= 2:
        return "Both coats on."
    return scripted.turn("Another coat. ", scripted.call("painter_Painter_Paint", wall="north"))


async def test_a_decision_made_against_an_earlier_pause_of_the_run_is_refused(runtime: micro.Runtime) -> None:
    twice = micro.Agent("twice", services=["painter"], prompt="You paint.", runtime=runtime,
                        provider=scripted.function(_twice), needs_approval=["painter_Painter_Paint"])
    async with twice:
        rsp = await runtime.client.call("twice", "Agent.Chat", {"message": "paint"})
        run_id = rsp["run_id"]
        async with _client(dashboard(runtime)) as http:
            first = await http.get(f"/agents/twice/runs/{run_id}")
            pause = re.search(r'name="pause" value="([^"]+)"', first.text)
            assert pause is not None
            ok = await http.post(f"/ui/agents/twice/runs/{run_id}/resume",
                                 data={"action": "approve", "call_id": rsp["pending"][0]["call_id"],
                                       "pause": pause.group(1), "csrf": _csrf(first.text)})
            assert ok.status_code == 303
            run = (await runtime.client.call("twice", "AgentInfo.Run", {"id": run_id}))["run"]
            assert run["status"] == "paused" and run["pause"] != pause.group(1)  # its second pause
            # the first page's form, with the new pause's call id (a provider without tool-call ids numbers
            # them call_0, call_1… in every response, so an old form can name a new call)
            stale = await http.post(f"/ui/agents/twice/runs/{run_id}/resume",
                                    data={"action": "deny", "call_id": run["pending"][0]["call_id"],
                                          "pause": pause.group(1), "csrf": _csrf(first.text)})
            assert stale.status_code == 400 and "no longer waits in the pause these decisions were made" in stale.text
            assert (await runtime.client.call("twice", "AgentInfo.Run", {"id": run_id}))["run"] == run
            fresh = await http.get(f"/agents/twice/runs/{run_id}")
            assert f'name="pause" value="{run["pause"]}"' in fresh.text


async def test_the_service_list_shows_each_nodes_own_health_check(runtime: micro.Runtime) -> None:
    from micro.registry import Node, ServiceRecord

    (painter,) = await runtime.registry.get("painter")
    address = painter.nodes[0].address
    gone = socket_nobody_listens_on()
    # a node whose process died before its record expired; another server now answering at painter's address
    await runtime.registry.register(ServiceRecord("dead", nodes=[Node("dead-1", gone)]), ttl=60)
    await runtime.registry.register(ServiceRecord("ghost", nodes=[Node("ghost-1", address)]), ttl=60)
    async with _client(dashboard(runtime)) as http:
        page = await http.get("/")
    states = dict(re.findall(r'<span class="node [^"]*" data-node="([^"]+)"[^>]*>● [^<]* <span class="health">'
                             r'([^<]+)</span>', page.text))
    assert states[painter.nodes[0].id] == "serving"
    assert states["dead-1"] == "unreachable" and states["ghost-1"] == "not this service"
    assert f"{gone}: " in page.text  # the hover text says why


async def test_the_local_brokers_delivery_node_says_it_serves() -> None:
    # before: its health check answered NOT_SERVING while it delivered (nothing set it serving)
    async with micro.Runtime(registry="memory://", broker="local://", store="memory://") as rt:
        async def ignore(msg: Any) -> None:
            pass

        sub = await rt.broker.subscribe("events.x", ignore)
        try:
            (record,) = await rt.registry.get("micro-broker")
            assert await nodes.check(rt.client, "micro-broker", record.nodes[0]) == nodes.Health(
                "serving", f"{record.nodes[0].address} serves micro-broker")
        finally:
            await sub.unsubscribe()


async def test_the_local_brokers_delivery_node_is_not_serving_while_a_backend_does_not_answer() -> None:
    from micro.store.memory import MemoryStore

    class Flaky(MemoryStore):
        down = False

        async def list(self, *args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise OSError("the disk is gone")
            return await super().list(*args, **kwargs)

    store = Flaky()
    async with micro.Runtime(registry="memory://", broker="local://", store=store) as rt:
        async def ignore(msg: Any) -> None:
            pass

        sub = await rt.broker.subscribe("events.x", ignore)
        try:
            (record,) = await rt.registry.get("micro-broker")
            node = record.nodes[0]
            store.down = True
            await rt.backends.check()  # as the runtime's 5 s checks do
            assert (await nodes.check(rt.client, "micro-broker", node)).state == "not serving"
            store.down = False
            await rt.backends.check()
            assert (await nodes.check(rt.client, "micro-broker", node)).state == "serving"
        finally:
            await sub.unsubscribe()


def socket_nobody_listens_on() -> str:
    import socket

    with socket.socket() as s:  # bound, never listening, then closed: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_node_health_is_asked_once_per_ttl_and_forgets_nodes_that_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from micro.registry import Node, ServiceRecord

    asked: list[str] = []

    async def check(client: Any, service: str, node: Node, timeout: float = 1.0) -> nodes.Health:
        asked.append(node.id)
        return nodes.Health("serving")

    monkeypatch.setattr(nodes, "check", check)
    now = [0.0]
    health = nodes.NodeHealth(None, ttl=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    a, b = ServiceRecord("a", nodes=[Node("a-1", "h:1")]), ServiceRecord("b", nodes=[Node("b-1", "h:2")])
    assert await health.of([a, b]) == {("a", "a-1"): nodes.Health("serving"), ("b", "b-1"): nodes.Health("serving")}
    now[0] = 4.0
    await health.of([a, b])  # within the ttl: nobody asked again
    assert sorted(asked) == ["a-1", "b-1"]
    await health.of([a])  # b left: forgotten
    now[0] = 5.0
    await health.of([a, b])  # a is asked again (ttl), and b anew although its answer would still be fresh
    assert sorted(asked) == ["a-1", "a-1", "b-1", "b-1"]


async def test_concurrent_pages_share_each_nodes_check_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from micro.registry import Node, ServiceRecord

    asked: list[str] = []
    answer = anyio.Event()

    async def check(client: Any, service: str, node: Node, timeout: float = 1.0) -> nodes.Health:
        asked.append(node.id)
        await answer.wait()
        return nodes.Health("serving")

    monkeypatch.setattr(nodes, "check", check)
    health = nodes.NodeHealth(None, ttl=5.0)  # type: ignore[arg-type]
    records = [ServiceRecord(f"s{i}", nodes=[Node(f"n{i}", f"h:{i}")]) for i in range(13)]
    seen: list[dict[tuple[str, str], nodes.Health]] = []

    async def page() -> None:
        seen.append(await health.of(records))

    async with anyio.create_task_group() as tg:  # 20 open pages woken by one registry change
        for _ in range(20):
            tg.start_soon(page)
        await anyio.wait_all_tasks_blocked()  # all 20 are in: the first asks, the others wait for it
        answer.set()
    assert sorted(asked) == sorted(f"n{i}" for i in range(13))  # 13 checks, not 260
    assert len(seen) == 20 and all(len(s) == 13 for s in seen)


async def test_a_node_with_an_address_that_is_not_host_port_is_unreachable_not_a_failed_page(
        runtime: micro.Runtime) -> None:
    from micro.registry import Node, ServiceRecord

    await runtime.registry.register(ServiceRecord("odd", nodes=[Node("odd-1", "unix:/run/x.sock")]), ttl=60)
    async with _client(dashboard(runtime)) as http:
        page = await http.get("/")
    assert page.status_code == 200
    states = dict(re.findall(r'<span class="node [^"]*" data-node="([^"]+)"[^>]*>● [^<]* <span class="health">'
                             r'([^<]+)</span>', page.text))
    assert states["odd-1"] == "unreachable" and "unix:/run/x.sock: " in page.text
    (painter,) = await runtime.registry.get("painter")
    assert states[painter.nodes[0].id] == "serving"  # the others are still shown


async def test_node_health_reaches_nodes_behind_a_private_ca_and_mutual_tls_through_the_runtimes_client(
        tmp_path: Any) -> None:
    import trustme

    from micro.registry.memory import MemoryRegistry
    from micro.tls import client_context, server_context

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.issue_cert("dashboard@micro").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    registry = MemoryRegistry()
    server_tls = server_context(tmp_path / "server.pem", tmp_path / "server.pem", ca=tmp_path / "ca.pem",
                                require_client_cert=True)
    async with micro.Runtime(registry=registry, store="memory://", broker="memory://") as server_rt:
        secure = micro.Service("secure", runtime=server_rt, tls=server_tls)
        secure.handle(Painter())
        async with secure, micro.Runtime(registry=registry, store="memory://", broker="memory://",
                                         tls=client_context(tmp_path / "ca.pem", cert=tmp_path / "client.pem")) as rt:
            (node,) = secure.record.nodes
            health = nodes.NodeHealth(rt.client, ttl=0.0)
            assert await health.of([secure.record]) == {
                ("secure", node.id): nodes.Health("serving", f"{node.address} serves secure")}
            channel = rt.client.grpc_channel(node)
            await health.of([secure.record])  # asked again (ttl 0) over the same pooled connection
            assert rt.client.grpc_channel(node) is channel


def test_call_rates_are_the_last_minutes_differences_and_forget_what_left() -> None:
    now = [100.0]
    rates = nodes.CallRates(window=60.0, clock=lambda: now[0])
    assert rates.sample(["a", "b"], {"a": 10, "b": 5}) == {}  # one sample: no rate yet
    now[0] = 110.0
    assert rates.sample(["a", "b", "c"], {"a": 40, "b": 5}) == {"a": 3.0, "b": 0.0}  # c: not served here
    for i in range(1, 200):  # one sample a second for over three minutes: only the last minute counts
        now[0] = 110.0 + i
        got = rates.sample(["a"], {"a": 40 + 2 * i})
    assert got == {"a": 2.0}
    now[0] += 0.5
    assert rates.sample(["a"], {"a": 10_000}) == {"a": 2.0}  # under a second since the last: not a sample
    now[0] += 1
    assert rates.sample(["b"], {"a": 1, "b": 7}) == {}  # b came back: measured anew; a is forgotten
    now[0] += 2
    assert rates.sample(["a", "b"], {"a": 5, "b": 13}) == {"b": 3.0}
    now[0] += 3600  # nobody looked for an hour: 3600 calls in its last minute are 60/s, not 1/s over the hour
    assert rates.sample(["b"], {"b": 13 + 3600}) == {}  # the old sample is gone: one sample, no rate yet
    now[0] += 2
    assert rates.sample(["b"], {"b": 13 + 3600 + 120}) == {"b": 60.0}


async def test_the_service_list_shows_call_rates_from_this_processs_metrics() -> None:
    from prometheus_client import CollectorRegistry

    micro.metrics.enable(CollectorRegistry())
    try:
        async with micro.Runtime(registry="memory://", store="memory://", broker="memory://") as rt:
            painter = micro.Service("painter", runtime=rt)
            painter.handle(Painter())
            async with painter:
                asgi = dashboard(rt)
                async with _client(asgi) as http:
                    now = [0.0]
                    asgi.state.dashboard.rates.clock = lambda: now[0]
                    first = await http.get("/")
                    for _ in range(30):
                        await rt.client.call("painter", "Painter.Paint", {"wall": "w"})
                    now[0] = 10.0
                    second = await http.get("/")
    finally:
        micro.metrics.disable()
    rate = re.compile(r'<tr data-service="painter">.*?<td class="rate">([^<]*)<', re.S)
    assert rate.search(first.text).group(1) == ""  # type: ignore[union-attr]  # one sample: no rate yet
    assert rate.search(second.text).group(1) == "3.0"  # type: ignore[union-attr]  # 30 calls in 10 s


async def test_the_service_list_shows_call_rates_of_other_processes_from_the_metrics_their_nodes_name(
        runtime: micro.Runtime) -> None:
    import asyncio

    from micro.registry import Node, ServiceRecord

    served = [5]  # the other process's calls so far (and one failed call besides)
    reads: list[int] = []

    async def metrics_page(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        reads.append(served[0])
        body = ("# HELP micro_rpc_server_calls Calls a service answered.\n# TYPE micro_rpc_server_calls counter\n"
                f'micro_rpc_server_calls_total{{service="far",endpoint="Far.Go",path="native",code="OK"}} {served[0]}\n'
                'micro_rpc_server_calls_total{service="far",endpoint="Far.Go",path="grpc",code="INTERNAL"} 1\n'
                'micro_rpc_server_calls_total{service="near",endpoint="Near.Go",path="grpc",code="OK"} 9\n').encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(metrics_page, "127.0.0.1", 0)
    closed = await asyncio.start_server(metrics_page, "127.0.0.1", 0)  # a process gone: nothing listens there
    gone = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    try:
        there = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        await runtime.registry.register(ServiceRecord("far", nodes=[
            Node("far-1", "127.0.0.1:1", metadata={"metrics": there}),
            Node("far-2", "127.0.0.1:2", metadata={"metrics": there})]), ttl=60)  # one process, two services' nodes
        await runtime.registry.register(ServiceRecord("lost", nodes=[
            Node("lost-1", "127.0.0.1:3", metadata={"metrics": f"127.0.0.1:{gone}"})]), ttl=60)
        asgi = dashboard(runtime)
        now = [0.0]
        board = asgi.state.dashboard
        board.rates.clock = board.remote._kept.clock = lambda: now[0]
        async with _client(asgi) as http:
            first = await http.get("/")
            served[0] += 30
            await http.get("/")  # within the ttl: the other process is not read again
            now[0] = 10.0
            second = await http.get("/")
    finally:
        server.close()
        await server.wait_closed()
    assert reads == [5, 35]  # one read per ttl, however many nodes name the address
    rate = re.compile(r'<tr data-service="(\w+)">.*?<td class="rate">(.*?)</td>', re.S)
    assert "measured once so far" in dict(rate.findall(first.text))["far"]
    cells = dict(rate.findall(second.text))
    assert cells["far"] == "3.0"  # 30 calls in 10 s, read from the other process's /metrics
    assert "no metrics from its processes" in cells["lost"]  # its address does not answer: no rate, no error


async def test_element_ids_made_from_names_cannot_reach_other_elements(runtime: micro.Runtime) -> None:
    from micro.registry import Endpoint, Node, ServiceRecord

    odd = ServiceRecord("odd", endpoints=[
        Endpoint("x, body", "/odd/x", request={"properties": {'a" onfocus="x': {"type": "string"}}}),
        Endpoint("Odd.Plain", "/odd/Odd.Plain")], nodes=[Node("odd-1", "127.0.0.1:1")])
    await runtime.registry.register(odd, ttl=60)
    async with _client(dashboard(runtime)) as http:
        page = await http.get("/services/odd")
    targets = re.findall(r'hx-target="#result-([^"]*)"', page.text)
    assert len(targets) == 2 and targets[1] == "Odd-Plain"  # a plain name stays readable
    assert re.fullmatch(r"h[0-9a-f]{16}", targets[0])  # the other: a hash, no comma, space or quote
    assert f'id="ep-{targets[0]}"' in page.text and f'id="result-{targets[0]}"' in page.text
    assert 'onfocus="x"' not in page.text  # the field's name is text, never an attribute
    field_ids = re.findall(r'<input type="text" id="([^"]*)"', page.text)
    assert field_ids == [f"f-{targets[0]}-" + field_ids[0].rsplit("-", 1)[1]]
    assert re.fullmatch(r"h[0-9a-f]{16}", field_ids[0].rsplit("-", 1)[1])


async def test_with_a_token_pages_need_the_login_cookie(runtime: micro.Runtime) -> None:
    async with _client(dashboard(runtime, token=TOKEN)) as http:
        rsp = await http.get("/agents/helper")
        assert rsp.status_code == 303 and rsp.headers["location"] == "/login?next=/agents/helper"
        assert (await http.get("/api/services", headers={"Accept": "application/json"})).status_code == 401
        assert (await http.get("/static/htmx.min.js")).status_code == 200
        login = await http.get("/login?next=/agents/helper")
        wrong = await http.post("/login?next=/agents/helper", data={"token": "nope", "csrf": _csrf(login.text)})
        assert wrong.status_code == 401 and "micro_token" not in wrong.headers.get("set-cookie", "")
        rsp = await http.post("/login?next=/agents/helper", data={"token": TOKEN, "csrf": _csrf(login.text)})
        assert rsp.status_code == 303 and rsp.headers["location"] == "/agents/helper"
        cookie = rsp.headers["set-cookie"]
        assert cookie.startswith("micro_token_8080=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        kept = http.cookies["micro_token_8080"]
        assert TOKEN not in cookie and len(kept) == 64  # a value derived from the token, not the token
        assert (await http.get("/agents/helper")).status_code == 200
        # the kept value is no bearer token, and it is this port's: another port's cookie does not log in
        bearer = await http.get("/api/services", headers={"Authorization": f"Bearer {kept}", "Cookie": "",
                                                            "Accept": "application/json"})
        assert bearer.status_code == 401
        for jar in ({"micro_token_8081": kept}, {"micro_token_8080": TOKEN}):
            other = await http.get("/agents/helper", headers={"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())})
            assert other.status_code == 303, jar
        page = await http.post("/logout", data={"csrf": _csrf(login.text)})
        assert page.status_code == 303 and (await http.get("/")).status_code == 303
        # after login, only a path on this server: never another site
        rsp = await http.post("/login?next=//evil.example/x", data={"token": TOKEN, "csrf": _csrf(login.text)})
        assert rsp.headers["location"] == "/"


async def test_mounted_under_a_path_links_and_logins_follow_it(runtime: micro.Runtime) -> None:
    site = Starlette(routes=[Mount("/micro", dashboard(runtime, token=TOKEN))])
    async with _client(site) as http:
        rsp = await http.get("/micro/services/painter")
        assert rsp.status_code == 303 and rsp.headers["location"] == "/micro/login?next=/micro/services/painter"
        login = await http.get("/micro/login")
        assert 'action="/micro/login?next=' in login.text and 'src="/micro/static/htmx.min.js"' in login.text
        # as a browser posts it: with the page's own Origin (the documented mount, no allowed_hosts given)
        rsp = await http.post("/micro/login?next=/micro/", data={"token": TOKEN, "csrf": _csrf(login.text)},
                              headers={"Origin": "http://127.0.0.1:8080"})
        assert rsp.headers["location"] == "/micro/" and "Path=/micro" in rsp.headers["set-cookie"]
        page = await http.get("/micro/")
        assert 'href="/micro/services/painter"' in page.text and 'sse-connect="/micro/ui/events/services"' in page.text
        assert (await http.get("/micro/static/dashboard.js")).status_code == 200


async def test_a_question_is_answered_from_the_page(runtime: micro.Runtime) -> None:
    rsp = await runtime.client.call("asker", "Agent.Chat", {"message": "paint"})
    assert rsp["status"] == "input_required"
    run_id, call_id = rsp["run_id"], rsp["pending"][0]["call_id"]
    async with _client(dashboard(runtime)) as http:
        page = await http.get(f"/agents/asker/runs/{run_id}")
        assert MARKUP not in page.text and "Which wall? &lt;script&gt;" in page.text  # the question, escaped
        assert f'name="call_id" value="{call_id}"' in page.text and '<label for="answer-' in page.text
        rsp = await http.post(f"/ui/agents/asker/runs/{run_id}/resume",
                              data={"action": "answer", "call_id": call_id, "answer": "north",
                                    "csrf": _csrf(page.text)})
        assert rsp.status_code == 303
        run = (await runtime.client.call("asker", "AgentInfo.Run", {"id": run_id}))["run"]
        assert run["status"] == "completed" and run["reply"] == "Painting the north wall."
        page = await http.get("/agents/asker?status=input_required")
        assert "No runs match." in page.text and "No run waits." in page.text


async def test_a_reopened_session_shows_its_earlier_turns_from_the_agents_memory(runtime: micro.Runtime) -> None:
    rsp = await runtime.client.call("asker", "Agent.Chat", {"message": f"paint it {MARKUP}", "session": "kept-1"})
    await runtime.client.call("asker", "Agent.Resume", {"run_id": rsp["run_id"], "answer": "north"})
    async with _client(dashboard(runtime)) as http:
        fresh = await http.get("/agents/asker")
        assert "earlier-turn" not in fresh.text  # a new session: nothing earlier
        assert 'href="?chat_session=kept-1#h-play"' in fresh.text  # the run list reopens its session
        page = await http.get("/agents/asker?chat_session=kept-1")
        assert 'id="chat-session" name="session" value="kept-1"' in page.text
        lines = re.findall(r'<div class="([^"]+) earlier-turn">([^<]*)</div>', page.text)
        assert lines == [
            ("you", "you: paint it &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"),  # escaped, as all data
            ("tool", "→ request_input({&#34;question&#34;:&#34;Which wall? &lt;script&gt;alert(\\&#34;x\\&#34;)"
                     "&lt;/script&gt;&#34;})"),
            ("result", "← north"), ("reply-text", "Painting the north wall.")]
        bad = await http.get("/agents/asker?chat_session=a/b")  # the agent's own refusal, on the page
        assert bad.status_code == 200 and 'role="alert"' in bad.text and "earlier-turn" not in bad.text


def test_a_reopened_sessions_transcript_starts_at_a_turn_and_shows_the_loops_own_words_as_such() -> None:
    from micro.agent.loop import SUMMARISE
    from micro.dashboard.pages import transcript

    def result(call: str, content: Any) -> dict[str, Any]:
        return {"type": "tool_result", "tool_use_id": call, "content": content}

    kept = [  # the last messages of a session: the cut fell inside a turn
        {"role": "user", "content": [result("c1", "orphan: its call was cut off")]},
        {"role": "assistant", "content": [{"type": "text", "text": "the end of a turn whose start is gone"}]},
        {"role": "user", "content": [{"type": "text", "text": "paint it"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c2", "name": "paint", "input": {"w": 1}}]},
        {"role": "user", "content": [result("c2", [{"type": "text", "text": "north"},
                                                   {"type": "text", "text": "done"}])]},
        {"role": "user", "content": [{"type": "text", "text": SUMMARISE}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Painted north."}]},
    ]
    assert transcript(kept) == [
        ("you", "you: paint it"), ("tool", '→ paint({"w":1})'), ("result", "← north done"),
        ("result", "(the run used every step it may: the agent was asked to answer now)"),
        ("reply-text", "Painted north.")]


async def test_dead_lettered_events_are_listed_and_replayed_from_the_flow_page(runtime: micro.Runtime) -> None:
    from micro.flow.record import FlowRun

    seen: list[Any] = []

    async def digest(event: dict[str, Any], run: FlowRun) -> str:
        seen.append(event)
        return "ok"

    flow = micro.NewFlow("eater", trigger="food.served", steps=[digest], runtime=runtime)
    async with flow:
        # as the flow records an event whose last JetStream delivery failed (tests/test_flow_durable.py)
        await flow.runs.put(FlowRun("bad-1", "eater", "food.served", event={"dish": MARKUP}, status="failed",
                                    attempts=3, error="ValueError: cannot digest", started=1.0,
                                    dead_lettered=True))
        await flow.runs.put(FlowRun("other", "eater", "food.served", event={}, status="failed", started=2.0))
        async with _client(dashboard(runtime)) as http:
            page = await http.get("/flows/eater")
            dead = page.text.split('id="h-dead"')[1].split("</section>")[0]
            assert 'data-run="bad-1"' in dead and 'data-run="other"' not in dead  # only the dead-lettered one
            assert "ValueError: cannot digest" in dead and MARKUP not in dead  # its event, escaped
            rsp = await http.post("/ui/flows/eater/runs/bad-1/replay", data={"csrf": _csrf(page.text)})
            assert rsp.status_code == 303 and rsp.headers["location"] == "/flows/eater/runs/bad-1-replay-1"
            assert seen == [{"dish": MARKUP}]  # the recorded event, run again through Flow.Replay
            page = await http.get("/flows/eater")
            dead = page.text.split('id="h-dead"')[1].split("</section>")[0]
            assert 'href="/flows/eater/runs/bad-1-replay-1">bad-1-replay-1</a> <span class="status completed">' in dead
            shown = await http.get("/flows/eater/runs/bad-1")
            assert "the broker moved the event to its dead-letter topic" in shown.text


async def test_replays_beside_a_dead_event_are_found_by_replay_of_and_a_stale_replay_is_refused(
        runtime: micro.Runtime) -> None:
    from micro.flow.record import FlowRun

    seen: list[Any] = []

    async def digest(event: dict[str, Any], run: FlowRun) -> str:
        seen.append(event)
        return "ok"

    flow = micro.NewFlow("eater", trigger="food.served", steps=[digest], runtime=runtime)
    async with flow:
        await flow.runs.put(FlowRun("bad-1", "eater", "food.served", event={"dish": 1}, status="failed",
                                    attempts=3, error="ValueError", started=1.0, dead_lettered=True))
        await flow.runs.put(FlowRun("bad-1-replay-1", "eater", "food.served", event={"dish": 1}, status="failed",
                                    started=2.0, replay_of="bad-1", error="again"))
        for i in range(40):  # newer runs than the page's 30: the replay is not among them
            await flow.runs.put(FlowRun(f"new-{i}", "eater", "food.served", event={}, status="completed",
                                        started=10.0 + i))
        async with _client(dashboard(runtime)) as http:
            page = await http.get("/flows/eater")
            dead = page.text.split('id="h-dead"')[1].split("</section>")[0]
            assert 'href="/flows/eater/runs/bad-1-replay-1">bad-1-replay-1</a> <span class="status failed">' in dead
            assert 'name="seen" value="1"' in dead and "Replay again" in dead
            rsp = await http.post("/ui/flows/eater/runs/bad-1/replay", data={"seen": "1", "csrf": _csrf(page.text)})
            assert rsp.status_code == 303 and rsp.headers["location"] == "/flows/eater/runs/bad-1-replay-2"
            # the same page's form again (a stale page, a second click): refused, naming the replay since
            stale = await http.post("/ui/flows/eater/runs/bad-1/replay", data={"seen": "1", "csrf": _csrf(page.text)})
            assert stale.status_code == 400
            assert "run &#39;bad-1&#39; was replayed since you looked: bad-1-replay-2 is completed" in stale.text
            assert seen == [{"dish": 1}]  # replayed once
            shown = await http.get("/flows/eater/runs/bad-1")
            assert 'name="seen" value="2"' in shown.text and "bad-1-replay-2</a>" in shown.text


class OldRunsRequest(msgspec.Struct):  # Flow.Runs of a flow node older than dead-lettering
    limit: int = 20
    status: list[str] | None = None


class OldRun(msgspec.Struct):
    id: str
    flow: str
    topic: str
    status: str = "completed"
    attempts: int = 1
    started: float = 0.0
    error: str = ""
    event: Any = None
    tool_calls: list[Any] = []
    trace: dict[str, Any] = {}


class OldRuns(msgspec.Struct):
    runs: list[OldRun]


class Flow:  # served as "Flow": the older node's run listing, which ignores dead_lettered
    async def Runs(self, req: OldRunsRequest) -> OldRuns:
        """Runs."""
        return OldRuns([OldRun("done-1", "olden", "x", started=1.0)])


async def test_an_older_flow_node_ignoring_the_dead_lettered_filter_lists_no_dead_events(
        runtime: micro.Runtime) -> None:
    olden = micro.Service("olden", runtime=runtime)
    olden.handle(Flow())
    async with olden, _client(dashboard(runtime)) as http:
        page = await http.get("/flows/olden")
    assert page.status_code == 200
    dead = page.text.split('id="h-dead"')[1].split("</section>")[0]
    assert "No event was dead-lettered." in dead and "done-1" not in dead and "/replay" not in dead
    assert "done-1" in page.text.split('id="h-runs"')[1]  # listed as a run, not as a dead event


async def test_unknown_services_and_runs_are_404_pages_that_say_so(runtime: micro.Runtime) -> None:
    async with _client(dashboard(runtime)) as http:
        for path, words in (("/services/paynter", "paynter"), ("/agents/nobody", "nobody"),
                            ("/agents/helper/runs/0123abc", "0123abc"), ("/agents/helper/runs/a%23b", "a#b")):
            page = await http.get(path)
            assert page.status_code == 404 and 'role="alert"' in page.text and words in page.text, path
        page = await http.get("/services/paynter")
        assert "painter" in page.text  # the closest name the registry has


async def test_the_pages_own_origin_passes_only_for_a_host_the_server_vouches_for(runtime: micro.Runtime) -> None:
    for hosts, host, allowed in ((["dash.example"], "dash.example", True), (["dash.example"], "evil.example", False),
                                 (None, "evil.example", False)):
        async with _client(dashboard(runtime, allowed_hosts=hosts), base=f"http://{host}") as http:
            page = await http.get("/services/painter")
            if hosts is not None and host not in hosts:
                assert page.status_code == 403 and "does not serve the host 'evil.example'" in page.text
                continue
            # without a Host list, a name re-pointed at this machine (DNS rebinding) would pass as "own"
            rsp = await http.post("/ui/call/painter/Painter.Paint", data={"wall": "w", "csrf": _csrf(page.text)},
                                  headers={"Origin": f"http://{host}"})
            assert (rsp.status_code == 200) is allowed, rsp.text
            if not allowed:
                assert rsp.status_code == 403 and "cross-origin request from 'http://evil.example'" in rsp.text
                # the advice names what `micro run` and `micro dashboard` have (they have no --allow-origin)
                assert "--allow-host" in rsp.text and "--allow-origin" not in rsp.text


async def _live_services(asgi: Any, receive: Any, send: Any) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/ui/events/services", "raw_path": b"/ui/events/services", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8080"), (b"accept", b"text/event-stream")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    with anyio.fail_after(10):
        await asgi(scope, receive, send)


async def test_a_slow_client_leaving_the_live_service_list_ends_it_cleanly(runtime: micro.Runtime) -> None:
    """The client leaves while the first table is still being written to it (a slow reader): the stream ends
    without an error (it used to exit a cancel scope in another task: RuntimeError)."""
    writing = anyio.Event()
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("more_body"):
            sent.append(message["body"])
            writing.set()
            await anyio.sleep_forever()  # the client reads nothing more

    async def receive() -> dict[str, Any]:
        await writing.wait()
        return {"type": "http.disconnect"}

    await _live_services(dashboard(runtime), receive, send)
    assert len(sent) == 1 and sent[0].startswith(b"event: services\n") and b"/services/painter" in sent[0]


async def test_the_live_service_list_follows_the_registry_and_ends_when_the_dashboard_closes(
        runtime: micro.Runtime) -> None:
    asgi = dashboard(runtime)
    tables: list[bytes] = []
    ended: list[dict[str, Any]] = []
    got = anyio.Event()

    async def send(message: dict[str, Any]) -> None:
        nonlocal got
        if message["type"] == "http.response.body":
            if message.get("more_body"):
                tables.append(message["body"])
                got.set()
            else:
                ended.append(message)

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with anyio.create_task_group() as tg:
        tg.start_soon(_live_services, asgi, receive, send)
        await got.wait()
        assert b"/services/glazier" not in tables[-1]
        got = anyio.Event()
        glazier = micro.Service("glazier", runtime=runtime)
        glazier.handle(Painter())
        async with glazier:
            while b"/services/glazier" not in tables[-1]:
                await got.wait()
                got = anyio.Event()
        asgi.state.dashboard.close()  # the server stops: the stream ends, the client is told
    assert ended == [{"type": "http.response.body", "body": b"", "more_body": False}]


async def test_a_form_over_max_body_is_refused_before_it_is_parsed(runtime: micro.Runtime) -> None:
    asgi = gateway(runtime, dashboard=True, max_body=2000, allowed_hosts=LOOPBACK_HOSTS)  # dashboard(...) has it too
    async with _client(asgi) as http:
        token = _csrf((await http.get("/services/painter")).text)
        body = f"csrf={token}&wall={'w' * 5000}".encode()
        form = {"Content-Type": "application/x-www-form-urlencoded"}

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the bytes are counted as they come
            for at in range(0, len(body), 1000):
                yield body[at:at + 1000]

        for content in (body, chunks()):
            rsp = await http.post("/ui/call/painter/Painter.Paint", content=content, headers=form)
            assert "RESOURCE_EXHAUSTED" in rsp.text and "2000-byte limit" in rsp.text  # (a 200 fragment for htmx)
            assert "painted" not in rsp.text
        # the other actions answer with the status: 413
        rsp = await http.post("/logout", content=body, headers=form)
        assert rsp.status_code == 413 and "2000-byte limit" in rsp.text
        # within the limit, the same form goes through
        rsp = await http.post("/ui/call/painter/Painter.Paint", content=f"csrf={token}&wall=north", headers=form)
        assert rsp.status_code == 200 and "north painted 1x" in rsp.text


async def test_a_flow_run_whose_model_step_waits_is_listed_and_decided_from_its_page(runtime: micro.Runtime) -> None:
    flow = micro.NewFlow("painting", trigger="paint.requested", prompt="the {wall} wall", services=["painter"],
                         provider=scripted.function(_brain), needs_approval=["painter_Painter_Paint"], runtime=runtime)
    async with flow:
        assert (await flow.run_event("ev-1", "paint.requested", {"wall": "north"})).status == "paused"
        async with _client(dashboard(runtime)) as http:
            listing = await http.get("/flows/painting")
            waits = listing.text.split('id="h-waiting"')[1].split("</section>")[0]
            assert 'href="/flows/painting/runs/ev-1"' in waits and "paused" in waits
            page = await http.get("/flows/painting/runs/ev-1")
            assert 'action="/ui/agents/painting/runs/ev-1/resume"' in page.text and 'value="deny"' in page.text
            assert "painter_Painter_Paint" in page.text and 'name="page" value="flow"' in page.text
            rsp = await http.post("/ui/agents/painting/runs/ev-1/resume",
                                  data={"action": "deny", "reason": "not today", "page": "flow",
                                        "csrf": _csrf(page.text)})
            assert rsp.status_code == 303 and rsp.headers["location"] == "/flows/painting/runs/ev-1"
            run = (await runtime.client.call("painting", "Flow.Show", {"id": "ev-1"}))["run"]
            assert run["status"] == "completed" and "not today" in run["reply"]
            page = await http.get("/flows/painting/runs/ev-1")
            assert 'value="deny"' not in page.text  # decided: no form left
            # deciding again: the engine's answer, on the flow run's page
            again = await http.post("/ui/agents/painting/runs/ev-1/resume",
                                    data={"action": "approve", "page": "flow", "csrf": _csrf(page.text)})
            assert again.status_code == 400 and "<h1>Run <code>ev-1</code>" in again.text and "completed" in again.text
            # an event id is anyone's text: links and redirects quote it whole
            assert (await flow.run_event("ev 2?x", "paint.requested", {"wall": "south"})).status == "paused"
            listing = await http.get("/flows/painting")
            assert 'href="/flows/painting/runs/ev%202%3Fx"' in listing.text
            page = await http.get("/flows/painting/runs/ev%202%3Fx")
            assert 'action="/ui/agents/painting/runs/ev%202%3Fx/resume"' in page.text
            rsp = await http.post("/ui/agents/painting/runs/ev%202%3Fx/resume",
                                  data={"action": "approve", "page": "flow", "csrf": _csrf(page.text)})
            assert rsp.status_code == 303 and rsp.headers["location"] == "/flows/painting/runs/ev%202%3Fx"


async def test_open_live_pages_share_one_registry_watch_and_hand_it_over(runtime: micro.Runtime,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = runtime.registry.watch
    watching: list[int] = [0, 0]  # open now, most at once

    async def counted() -> AsyncIterator[Any]:
        watching[0] += 1
        watching[1] = max(watching)
        try:
            async with contextlib.aclosing(real()) as events:
                async for event in events:
                    yield event
        finally:
            watching[0] -= 1

    monkeypatch.setattr(runtime.registry, "watch", counted)
    asgi = dashboard(runtime)
    tables: list[list[bytes]] = [[], [], []]
    leave = [anyio.Event() for _ in tables]
    got = anyio.Event()

    def page(i: int) -> tuple[Any, Any]:
        async def send(message: dict[str, Any]) -> None:
            nonlocal got
            if message.get("more_body"):
                tables[i].append(message["body"])
                got.set()
                got = anyio.Event()

        async def receive() -> dict[str, Any]:
            await leave[i].wait()
            return {"type": "http.disconnect"}

        return receive, send

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(_live_services, asgi, *page(i))
        while not all(tables):
            await got.wait()
        assert watching[1] <= 1  # three pages, at most one watch at any time
        leave[0].set()
        leave[1].set()  # whichever ran the watch, the page left open takes it over
        glazier = micro.Service("glazier", runtime=runtime)
        glazier.handle(Painter())
        async with glazier:
            while b"/services/glazier" not in tables[2][-1]:
                await got.wait()
        leave[2].set()
    assert watching == [0, 1]  # one watch at a time throughout (one per page: three), and none left open


async def test_open_live_pages_share_one_service_table_per_change_or_refresh(runtime: micro.Runtime) -> None:
    asgi = dashboard(runtime)
    board = asgi.state.dashboard
    now = [0.0]
    board.clock = lambda: now[0]
    made: list[int] = []
    real = board.service_list

    async def counted() -> dict[str, Any]:
        made.append(board.registry_version)
        return await real()

    board.service_list = counted
    leave = anyio.Event()
    tables: list[list[bytes]] = [[], [], []]
    got = anyio.Event()

    def page(i: int) -> tuple[Any, Any]:
        async def send(message: dict[str, Any]) -> None:
            nonlocal got
            if message.get("more_body"):
                tables[i].append(message["body"])
                got.set()
                got = anyio.Event()

        async def receive() -> dict[str, Any]:
            await leave.wait()
            return {"type": "http.disconnect"}

        return receive, send

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(_live_services, asgi, *page(i))
        while not all(tables):
            await got.wait()
        await anyio.wait_all_tasks_blocked()  # the pages wait for a change or their refresh; one runs the watch
        assert board.watching
        first = len(made)
        events: list[bytes] = []

        async def render() -> None:
            events.append(await board.services_event(""))

        async with anyio.create_task_group() as renders:  # twenty more pages, or index loads, meanwhile
            for _ in range(20):
                renders.start_soon(render)
        assert len(made) == first and len(set(events)) == 1  # the table made for the first pages, shared
        now[0] = REFRESH  # the refresh: made once more, whoever asks
        events.clear()
        async with anyio.create_task_group() as renders:
            for _ in range(20):
                renders.start_soon(render)
        assert len(made) == first + 1 and len(set(events)) == 1
        leave.set()
