"""The dashboard's pages and actions: Starlette routes over a runtime's registry and client.

Every page is rendered on the server (Jinja2, autoescaped); live parts are
Server-Sent Events that htmx swaps in. Every action calls the same endpoints the
CLI calls: ``Agent.StreamChat`` / ``Agent.Resume`` / ``Agent.Cancel`` and
``AgentInfo.Runs|Run|Pending`` for agents, ``Flow.Runs|Show|Resume|Replay`` for
flows, and the endpoint itself for the try-it form, so the dashboard has no second
path to anything. Actions are POSTs that carry the CSRF token (:mod:`.security`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from micro import metrics
from micro.errors import BadRequest, EndpointNotFound, Error, NotFound, closest
from micro.gateway.http import DEFAULT_MAX_BODY, error_body, stream

from . import forms, nodes, security, timeline

if TYPE_CHECKING:
    from jinja2 import Environment

    from micro.registry import ServiceRecord
    from micro.runtime import Runtime

_encode = msgspec.json.Encoder().encode
_PRETTY = msgspec.json.Encoder()

AGENT_STATUSES = ("running", "paused", "input_required", "waiting", "completed", "failed", "cancelled", "expired",
                  "interrupted")
# scripts only from the server's own files (an injected inline script does not run), and no framing
# (clickjacking); htmx itself evaluates no strings as code (the htmx-config meta tag of base.html)
_PAGE_HEADERS = {"Content-Security-Policy": "script-src 'self'; frame-ancestors 'none'"}
_WAITS = ("waiting", "paused", "input_required")  # a flow run's statuses that wait (for an event or a person)
FLOW_STATUSES = ("running", "completed", "failed", "retrying", "cancelled", "paused", "input_required", "waiting")


REFRESH = 5.0
"""Seconds between two tables of the live service list when the registry does not change (health, rates)."""
HISTORY_MESSAGES = 60
"""How many of a reopened session's last messages the playground shows."""


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def transcript(messages: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """A session's stored messages (``AgentInfo.History``, as JSON) as the playground's lines: ``(class, text)``,
    the lines its script writes for a live turn (``you: …``, the reply, ``→ tool(args)``, ``← result``).

    The messages are a session's last ones, so they may start mid-turn: what comes before the first message
    of the person's is left out (a result whose call was cut off would stand alone). The loop's own request
    to answer at the step limit is a note, not the person's words."""
    from micro.agent.loop import SUMMARISE

    def said(m: Mapping[str, Any]) -> bool:
        return m.get("role") == "user" and any(b.get("type") == "text" for b in m.get("content") or [])

    start = next((i for i, m in enumerate(messages) if said(m)), 0)
    lines: list[tuple[str, str]] = []
    calls: set[str] = set()
    for m in messages[start:]:
        for block in m.get("content") or []:
            kind = block.get("type")
            if kind == "text" and block.get("text"):
                if m.get("role") != "user":
                    lines.append(("reply-text", str(block["text"])))
                elif block["text"] == SUMMARISE:
                    lines.append(("result", "(the run used every step it may: the agent was asked to answer now)"))
                else:
                    lines.append(("you", f"you: {block['text']}"))
            elif kind == "tool_use":
                calls.add(str(block.get("id", "")))
                args = _encode(block.get("input") or {}).decode()
                lines.append(("tool", f"→ {block.get('name', '?')}({_clip(args, 120)})"))
            elif kind == "tool_result" and str(block.get("tool_use_id", "")) in calls:
                failed = bool(block.get("is_error"))
                lines.append(("result fail" if failed else "result",
                              f"{'✗' if failed else '←'} {_clip(_text_of(block.get('content', '')), 200)}"))
    return lines


def _text_of(content: Any) -> str:
    """A tool result's content as text: a string as it is; content blocks (a list) by their text, else JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, Mapping) and "text" in b for b in content):
        return " ".join(str(b["text"]) for b in content)
    return _encode(content).decode()


def pretty(value: Any) -> str:
    """JSON, indented, for a ``<pre>``."""
    return msgspec.json.format(_PRETTY.encode(value), indent=2).decode()


def kind_of(record: ServiceRecord) -> str:
    """``agent``, ``flow`` or ``service``: what the registry record's metadata says it is."""
    return record.metadata.get("type", "service")


class Dashboard:
    """The pages, partials and actions of one dashboard (one per ASGI app).

    Args:
        runtime: whose registry is shown and whose client makes the calls.
        timeout: seconds each call (or a whole streamed chat) may take.
        token: the server's token, when it has one (the login form checks it; pages need it).
        max_body: the largest form accepted, in bytes (larger: refused with 413 before it is parsed).
    """

    def __init__(self, runtime: Runtime, *, timeout: float, token: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY) -> None:
        self.runtime = runtime
        self.timeout = timeout
        self.max_body = max_body
        self._token = token.encode() if token is not None else None
        self._env: Environment | None = None
        self._closing = False
        self._closed: anyio.Event | None = None
        # the registry's changes, fanned out to the open live pages from one watch (see follow_registry)
        self._version = 0
        self._changed: anyio.Event | None = None
        self._watcher: anyio.Event | None = None  # set when the page running the watch stops running it
        self._watched = False
        self.health = nodes.NodeHealth(runtime.client)  # each node's own health check, asked at most every few seconds
        self.rates = nodes.CallRates()  # calls per second of the services (where their processes collect metrics)
        self.remote = nodes.RemoteCalls()  # the calls other processes served, from the /metrics their nodes name
        # the service table every open page shows, made once per registry change or REFRESH (see snapshot)
        self.clock: Callable[[], float] = time.monotonic
        self._snapshot: _Snapshot | None = None
        self._making: anyio.Event | None = None

    def close(self) -> None:
        """End the live streams (the server is stopping: they would hold it up)."""
        self._closing = True
        if self._closed is not None:
            self._closed.set()

    async def until_closed(self) -> None:
        """Until :meth:`close` is called."""
        if self._closed is None:
            self._closed = anyio.Event()
        if self._closing:
            return
        await self._closed.wait()

    # ------------------------------------------------------------------ registry changes
    async def follow_registry(self) -> None:
        """Keep the dashboard's one registry watch running while the calling page is open.

        Every live page runs this in its own task group; one of them runs the watch, the others wait.
        When that page leaves (its task group cancels this), another takes the watch over, so the
        registry is watched once however many pages are open, by a task some open page owns.
        """
        while self._watcher is not None:
            await self._watcher.wait()
        self._watcher = anyio.Event()
        try:
            async with contextlib.aclosing(self.runtime.registry.watch()) as watcher:
                if self._watched:  # taken over: a change between the two watches would be missed
                    self._bump()
                self._watched = True
                async for _ in watcher:
                    self._bump()
        finally:
            gone, self._watcher = self._watcher, None
            gone.set()

    def _bump(self) -> None:
        self._version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    @property
    def watching(self) -> bool:
        """Whether an open live page runs the registry watch now (then changes are seen as they happen)."""
        return self._watcher is not None

    @property
    def registry_version(self) -> int:
        """How many changes of the registry the dashboard's watch has seen."""
        return self._version

    async def registry_changed(self, seen: int) -> int:
        """The registry's change count once it is past ``seen`` (at once if it already is)."""
        while self._version == seen:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        return self._version

    # ------------------------------------------------------------------ rendering
    @property
    def env(self) -> Environment:
        """The Jinja2 environment, made on first use (so start-up does not import or compile templates)."""
        if self._env is None:
            from jinja2 import Environment, PackageLoader, select_autoescape

            env = Environment(loader=PackageLoader("micro.dashboard", "templates"),
                              autoescape=select_autoescape(default=True, default_for_string=True))
            env.filters["pretty"] = pretty
            env.filters["when"] = security.when
            env.filters["path"] = _part
            env.filters["ident"] = ident
            env.globals["kind_of"] = kind_of
            self._env = env
        return self._env

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        token, fresh = security.csrf_token(request)
        base = request.scope.get("root_path", "")
        body = self.env.get_template(name).render(request=request, base=base, csrf=token,
                                                  login=self._token is not None, **context)
        rsp = Response(body, status_code=status, media_type="text/html", headers=_PAGE_HEADERS)
        if fresh:
            security.set_csrf(rsp, request, token, base)
        return rsp

    def _fragment(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    # ------------------------------------------------------------------ registry
    async def records(self) -> list[ServiceRecord]:
        order = {"service": 0, "agent": 1, "flow": 2}
        return sorted(await self.runtime.registry.list(), key=lambda r: (order.get(kind_of(r), 3), r.name))

    async def record(self, name: str) -> ServiceRecord:
        """The merged record of ``name``; ``NotFound`` suggesting the closest registered name."""
        from micro.registry import merge

        try:
            found = merge(await self.runtime.registry.get(name))
        except NotFound as exc:
            names = [r.name for r in await self.runtime.registry.list()]
            guess = closest(name, names)
            raise NotFound(exc.message + (f"; did you mean {guess}?" if guess else "")) from None
        if not found:
            raise NotFound(f"{name!r} is not registered")
        return found[0]

    async def service_list(self) -> dict[str, Any]:
        """What the service table shows: the records, each node's health and each service's call rate."""
        records = await self.records()
        health: dict[tuple[str, str], nodes.Health] = {}
        remote: dict[str, int] = {}

        async def ask_health() -> None:
            health.update(await self.health.of(records))

        async def read_remote() -> None:
            remote.update(await self.remote.served(records))

        async with anyio.create_task_group() as tg:  # both ask other processes, each within a second
            tg.start_soon(ask_health)
            tg.start_soon(read_remote)
        served = metrics.calls_served()
        if metrics.enabled():  # this runtime's services count from 0, before their first call
            for name in self.runtime.local:
                served.setdefault(name, 0)
        for name, n in remote.items():
            served[name] = served.get(name, 0) + n
        return {"records": records, "health": health, "counted": set(served),
                "rates": self.rates.sample((r.name for r in records), served)}

    async def snapshot(self) -> _Snapshot:
        """The service table's data as every open page shows it: made again (:meth:`service_list`) once the
        registry changed or it is ``REFRESH`` seconds old (or, while no live page watches the registry, each
        time), by one caller at a time while the others await it, so however many pages are open the
        registry is listed, the nodes asked and the table rendered once per change or refresh, not per page."""
        while True:
            snap = self._snapshot
            if (snap is not None and snap.version == self._version and self.clock() - snap.made < REFRESH
                    and self.watching):  # while no live page watches, a change would go unseen
                return snap
            if self._making is None:
                break
            await self._making.wait()  # another page is making it (if it failed, the next round makes it here)
        self._making = anyio.Event()
        try:
            version = self._version
            snap = _Snapshot(self.clock(), version, await self.service_list())
            self._snapshot = snap
        finally:
            made, self._making = self._making, None
            made.set()
        return snap

    # ------------------------------------------------------------------ pages
    async def index(self, request: Request) -> Response:
        return self.render(request, "index.html", **(await self.snapshot()).data)

    async def events_services(self, request: Request) -> Response:
        """SSE: the service table, again each time the registry changes (htmx swaps it in)."""
        return _LiveServices(self, request.scope.get("root_path", ""))

    async def services_event(self, base: str) -> bytes:
        """The service table as one Server-Sent Event (links under ``base``)."""
        snap = await self.snapshot()
        event = snap.events.get(base)
        if event is None:  # rendered once per snapshot (and mount path), for every page
            event = snap.events[base] = _event("services", self._fragment("_services.html", base=base, **snap.data))
        return event

    async def service(self, request: Request) -> Response:
        name = request.path_params["service"]
        try:
            record = await self.record(name)
        except Error as exc:
            return self.render(request, "error.html", 404, title=name, error=exc.message)
        endpoints = [(ep, forms.fields(ep.request)) for ep in record.endpoints]
        return self.render(request, "service.html", record=record, endpoints=endpoints)

    async def call(self, request: Request) -> Response:
        """The try-it form: convert the form by the request schema, call, show the response (an htmx fragment).

        Every answer is a 200 fragment, a refusal (CSRF, size) and a failed call too, with the error's code:
        htmx swaps in only 2xx responses, and the person at the form should see why."""
        service, endpoint = request.path_params["service"], request.path_params["endpoint"]
        try:
            form = await security.posted(request, max_body=self.max_body)
            record = await self.record(service)
            ep = record.endpoint(endpoint)
            schema = ep.request if ep is not None else {}
            data = forms.values(schema, form, where=f"{service} {endpoint}")
            if ep is not None and ep.streaming:
                items = [item async for item in self.runtime.client.stream(service, endpoint, data,
                                                                             timeout=self.timeout)]
                result: Any = items
            else:
                result = await self.runtime.client.call(service, endpoint, data, timeout=self.timeout)
        except security.Refused as exc:  # 200, as every answer of this form: htmx swaps in only a 2xx one
            return Response(self._fragment("_result.html", error=str(exc), code=exc.code), 200,
                            media_type="text/html")
        except Error as exc:
            return Response(self._fragment("_result.html", error=exc.message, code=exc.code), 200,
                            media_type="text/html")
        return Response(self._fragment("_result.html", result=result), media_type="text/html")

    # ------------------------------------------------------------------ agents
    async def _info(self, name: str, endpoint: str, req: Mapping[str, Any]) -> Any:
        return await self.runtime.client.call(name, f"AgentInfo.{endpoint}", dict(req), timeout=self.timeout)

    async def agent(self, request: Request, *, error: str = "", status: int = 200) -> Response:
        name = request.path_params["agent"]
        q = request.query_params
        statuses = [s for s in q.getlist("status") if s]
        session = q.get("session") or ""
        chat_session = q.get("chat_session") or ""
        try:
            record = await self.record(name)
            runs = await self._info(name, "Runs", {"limit": 30, "session": session or None,
                                                   "status": statuses or None})
            pending = await self._info(name, "Pending", {})
        except Error as exc:
            return self.render(request, "error.html", 404, title=name, error=exc.message)
        earlier: list[tuple[str, str]] = []
        if chat_session:  # a session reopened: its earlier turns, from the agent's memory
            try:
                kept = await self._info(name, "History", {"session": chat_session, "limit": HISTORY_MESSAGES})
            except Error as exc:
                error = error or exc.message
            else:
                earlier = transcript(kept["messages"])
        return self.render(request, "agent.html", status, record=record, runs=runs["runs"],
                           pending=pending["runs"], statuses=AGENT_STATUSES, chosen=statuses, session=session,
                           chat_session=chat_session or f"dashboard-{secrets.token_hex(3)}", earlier=earlier,
                           error=error)

    async def chat(self, request: Request) -> Response:
        """The playground: ``Agent.StreamChat`` as Server-Sent Events (the page's script renders them)."""
        name = request.path_params["agent"]
        try:
            form = await security.posted(request, max_body=self.max_body)
            message = form.get("message", "")
            session = form.get("session", "")
            return await stream(self.runtime, name, "Agent.StreamChat", {"message": message, "session": session},
                                timeout=self.timeout)
        except security.Refused as exc:
            return Response(error_body(exc.code, str(exc)), exc.status, media_type="application/json")
        except Error as exc:
            return Response(error_body(exc.code, exc.message), 400, media_type="application/json")

    async def agent_run(self, request: Request, *, error: str = "", status: int = 200) -> Response:
        name, run_id = request.path_params["agent"], request.path_params["run"]
        try:
            run = (await self._info(name, "Run", {"id": run_id}))["run"]
        except Error as exc:
            return self.render(request, "error.html", 404, title=f"{name} run {run_id}", error=exc.message)
        bars = timeline.agent_bars(run)
        end = float(run.get("finished") or 0.0) or float(run.get("updated") or 0.0)
        tl = timeline.layout(bars, total=max(end - float(run.get("started") or end), 0.0))
        return self.render(request, "agent_run.html", status, agent=name, run=run, timeline=tl, error=error)

    async def resume(self, request: Request) -> Response:
        """Approve / deny (with a reason) / answer a waiting run: ``Agent.Resume``, as ``micro agent approve``."""
        name, run_id = request.path_params["agent"], request.path_params["run"]
        shown: Callable[..., Awaitable[Response]] = self.agent_run
        try:
            form = await security.posted(request, max_body=self.max_body)
            if form.get("page") == "flow":  # a flow run's model step: back to the flow run's page
                shown = self.flow_run
            kind = "flows" if form.get("page") == "flow" else "agents"
            back = f"/{kind}/{_part(name)}/runs/{_part(run_id)}"
            action = form.get("action", "")
            reason = form.get("reason", "")
            # pause: the pause the page showed; a decision made against an earlier one is refused (Conflict)
            req: dict[str, Any] = {"run_id": run_id, "reason": reason, "pause": form.get("pause", "")}
            call = form.get("call_id", "")
            if action == "answer":
                if call:  # one question of several, maybe: the run resumes once each is answered
                    req["decisions"] = [{"call_id": call, "answer": form.get("answer", "")}]
                    req["partial"] = True
                else:
                    req["answer"] = form.get("answer", "")
            elif action in ("approve", "deny"):
                calls = _call_ids(form.get("calls", "")) if not call else [call]
                if calls:  # these calls (one, or the undecided ones); a run resumes once every call is decided
                    req["decisions"] = [{"call_id": c, "approve": action == "approve", "reason": reason}
                                        for c in calls]
                    req["partial"] = True
                else:
                    req["approve_all" if action == "approve" else "deny_all"] = True
            elif action == "cancel":
                await self.runtime.client.call(name, "Agent.Cancel", {"run_id": run_id, "reason": reason},
                                               timeout=self.timeout)
                return _see(request, back)
            else:
                return await shown(request, error=f"unknown action {action!r}: approve, deny, answer or "
                                            "cancel", status=400)
            await self.runtime.client.call(name, "Agent.Resume", req, timeout=self.timeout)
        except security.Refused as exc:
            return await shown(request, error=str(exc), status=exc.status)
        except Error as exc:
            return await shown(request, error=exc.message, status=400)
        return _see(request, back)

    # ------------------------------------------------------------------ flows
    async def flow(self, request: Request) -> Response:
        name = request.path_params["flow"]
        statuses = [s for s in request.query_params.getlist("status") if s]
        try:
            record = await self.record(name)
            try:  # one read of the flow's runs: the list, the waiting ones, the dead-lettered ones, their replays
                found = await self.runtime.client.call(name, "Flow.Overview",
                                                       {"limit": 30, "status": statuses or None},
                                                       timeout=self.timeout)
            except EndpointNotFound:  # a flow node older than Flow.Overview
                found = await self._older_flow(name, statuses)
        except Error as exc:
            return self.render(request, "error.html", 404, title=name, error=exc.message)
        return self.render(request, "flow.html", record=record, runs=found["runs"], waiting=found["waiting"],
                           dead=found["dead_lettered"], replays=found["replays"], statuses=FLOW_STATUSES,
                           chosen=statuses)

    async def _older_flow(self, name: str, statuses: list[str]) -> dict[str, Any]:
        """:meth:`flow`'s runs from a flow node without ``Flow.Overview``, through ``Flow.Runs``."""
        runs = await self.runtime.client.call(name, "Flow.Runs", {"limit": 30, "status": statuses or None},
                                              timeout=self.timeout)
        # waiting at an Await step, or in its model step for a person (decided as an agent's run)
        waiting = await self.runtime.client.call(name, "Flow.Runs", {"limit": 30, "status": list(_WAITS)},
                                                 timeout=self.timeout)
        # events the (durable) broker dead-lettered; a node older than dead-lettering ignores the filter and
        # lists every run, so the record's own flag decides (else each would offer Replay: its side effects again)
        dead = await self.runtime.client.call(name, "Flow.Runs", {"limit": 30, "dead_lettered": True},
                                              timeout=self.timeout)
        replays: dict[str, list[Any]] = {}
        for r in reversed(runs["runs"]):
            if r.get("replay_of"):
                replays.setdefault(r["replay_of"], []).append(r)
        return {"runs": runs["runs"], "waiting": waiting["runs"],
                "dead_lettered": [r for r in dead["runs"] if r.get("dead_lettered")], "replays": replays}

    async def flow_run(self, request: Request, *, error: str = "", status: int = 200) -> Response:
        # also shown by resume() (its path names the flow as an agent): a decision on its model step
        name, run_id = request.path_params.get("flow") or request.path_params["agent"], request.path_params["run"]
        try:
            shown = await self.runtime.client.call(name, "Flow.Show", {"id": run_id}, timeout=self.timeout)
        except Error as exc:
            return self.render(request, "error.html", 404, title=f"{name} run {run_id}", error=exc.message)
        run = shown["run"]
        if run is None:
            return self.render(request, "error.html", 404, title=f"{name} run {run_id}",
                               error=f"flow {name} has no run {run_id}")
        waiting = run.get("waiting") or {}
        input_fields = forms.fields(waiting.get("schema") or {}) if waiting else []
        decision = None
        if run.get("status") in ("paused", "input_required"):  # its model step waits: Agent.Resume decides it
            try:
                pending = await self._info(name, "Pending", {})
            except Error as exc:
                error = error or exc.message
            else:
                decision = next((r for r in pending["runs"] if r.get("id") == run_id), None)
        names = list(run.get("trace") or {})
        tl = timeline.layout(timeline.flow_bars(run), names) if names else None
        return self.render(request, "flow_run.html", status, flow=name, run=run, timeline=tl, fields=input_fields,
                           decision=decision, replays=shown.get("replays") or [], error=error)

    async def flow_resume(self, request: Request) -> Response:
        """A waiting run's input form: ``Flow.Resume`` (the flow validates it against the step's schema)."""
        name, run_id = request.path_params["flow"], request.path_params["run"]
        try:
            form = await security.posted(request, max_body=self.max_body)
            run = (await self.runtime.client.call(name, "Flow.Show", {"id": run_id}, timeout=self.timeout))["run"]
            schema = ((run or {}).get("waiting") or {}).get("schema") or {}
            if schema.get("properties"):
                value: Any = forms.values(schema, form, where=f"flow {name} run {run_id}")
            else:
                value = forms.values({"properties": {"input": {}}, "required": ["input"]}, form,
                                     where=f"flow {name} run {run_id}")["input"]
            await self.runtime.client.call(name, "Flow.Resume", {"id": run_id, "input": value}, timeout=self.timeout)
        except security.Refused as exc:
            return await self.flow_run(request, error=str(exc), status=exc.status)
        except Error as exc:
            return await self.flow_run(request, error=exc.message, status=400)
        return _see(request, f"/flows/{_part(name)}/runs/{_part(run_id)}")

    async def flow_replay(self, request: Request) -> Response:
        """Run a recorded (failed) event again: ``Flow.Replay``, as ``micro flow replay``."""
        name, run_id = request.path_params["flow"], request.path_params["run"]
        try:
            form = await security.posted(request, max_body=self.max_body)
            req: dict[str, Any] = {"id": run_id}
            if form.get("seen", "").isdigit():  # the replays the page showed: refused if there are more now
                req["seen"] = int(form["seen"])
            rsp = await self.runtime.client.call(name, "Flow.Replay", req, timeout=self.timeout)
        except security.Refused as exc:
            return await self.flow_run(request, error=str(exc), status=exc.status)
        except Error as exc:
            return await self.flow_run(request, error=exc.message, status=400)
        return _see(request, f"/flows/{_part(name)}/runs/{_part(rsp['run']['id'])}")

    async def docs(self, request: Request) -> Response:
        """Swagger UI (vendored) over this server's ``/openapi.json``."""
        return self.render(request, "swagger.html")

    # ------------------------------------------------------------------ login
    async def login(self, request: Request) -> Response:
        target = security.safe_next(request.query_params.get("next", ""), request.scope.get("root_path", ""))
        if request.method == "GET":
            return self.render(request, "login.html", target=target, error="")
        try:
            form = await security.posted(request, max_body=self.max_body)
        except security.Refused as exc:
            return self.render(request, "login.html", exc.status, target=target, error=str(exc))
        token = form.get("token", "")
        if self._token is None or not token or not hmac.compare_digest(token.encode(), self._token):
            return self.render(request, "login.html", 401, target=target, error="that is not this server's token")
        rsp = RedirectResponse(target, status_code=303)
        security.set_login(rsp, request, token, request.scope.get("root_path", ""), https=request.url.scheme == "https")
        return rsp

    async def logout(self, request: Request) -> Response:
        try:
            await security.posted(request, max_body=self.max_body)
        except security.Refused as exc:
            return self.render(request, "error.html", exc.status, title="log out", error=str(exc))
        base = request.scope.get("root_path", "")
        rsp = RedirectResponse(f"{base}/login", status_code=303)
        security.clear_login(rsp, request, base)
        return rsp

    def routes(self) -> list[BaseRoute]:
        """The dashboard's routes: pages at ``/``, actions and live data under ``/ui/``, files under ``/static/``."""
        from importlib.resources import files

        static = StaticFiles(directory=str(files("micro.dashboard") / "static"))
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
            Route("/services/{service}", self.service, methods=["GET"]),
            Route("/agents/{agent}", self.agent, methods=["GET"]),
            Route("/agents/{agent}/runs/{run}", self.agent_run, methods=["GET"]),
            Route("/flows/{flow}", self.flow, methods=["GET"]),
            Route("/flows/{flow}/runs/{run}", self.flow_run, methods=["GET"]),
            Route("/ui/events/services", self.events_services, methods=["GET"]),
            Route("/ui/call/{service}/{endpoint}", self.call, methods=["POST"]),
            Route("/ui/agents/{agent}/chat", self.chat, methods=["POST"]),
            Route("/ui/agents/{agent}/runs/{run}/resume", self.resume, methods=["POST"]),
            Route("/ui/flows/{flow}/runs/{run}/resume", self.flow_resume, methods=["POST"]),
            Route("/ui/flows/{flow}/runs/{run}/replay", self.flow_replay, methods=["POST"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", static, name="static"),
        ]


def _part(value: Any) -> str:
    """One segment of a path: a name or run id quoted whole (``/``, ``?``, ``#`` too), the ``path`` filter."""
    return quote(str(value), safe="")


def _call_ids(raw: str) -> list[str]:
    """The ``calls`` field of the decide-all form: a JSON list of call ids (``BadRequest`` if it is not)."""
    if not raw:
        return []
    try:
        ids = msgspec.json.decode(raw, type=list[str])
    except msgspec.DecodeError:
        raise BadRequest(f"the form's calls {raw[:80]!r} are not a JSON list of call ids: reload the page") from None
    return [c for c in ids if c]


_PLAIN_ID = re.compile(r"[A-Za-z0-9_]{1,64}(?:\.[A-Za-z0-9_]{1,64})?")


def ident(value: Any) -> str:
    """A part of an element id (and of a ``#id`` selector such as an ``hx-target``) made from data.

    A plain name (``Task.ListOverdue``, ``user_id``, a hex run id) stays readable (``.`` as ``-``); anything
    else (spaces, quotes, commas, ``#``: a selector that could reach other elements) is ``h`` and 16 hex
    digits of its SHA-256, so no name of a service, field, run or call can change what a selector picks.
    """
    text = str(value)
    if _PLAIN_ID.fullmatch(text):
        return text.replace(".", "-")
    return "h" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _see(request: Request, path: str) -> Response:
    """Post/redirect/get: after an action, the page that shows its outcome."""
    return RedirectResponse(request.scope.get("root_path", "") + path, status_code=303)


def _event(name: str, html: str) -> bytes:
    lines = html.replace("\r", "").split("\n")
    return (f"event: {name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


class _Snapshot:
    """The service table's data (:meth:`Dashboard.service_list`) when it was made, for which registry version,
    and its Server-Sent Event rendered per mount path."""

    __slots__ = ("data", "events", "made", "version")

    def __init__(self, made: float, version: int, data: dict[str, Any]) -> None:
        self.made, self.version, self.data = made, version, data
        self.events: dict[str, bytes] = {}


class _LiveServices(Response):
    """The live service list: a table now, and again after each change of the registry.

    As :class:`micro.gateway.http.EventStream`: the loop runs in the task that serves the request;
    child tasks keep the dashboard's one registry watch going (:meth:`Dashboard.follow_registry`),
    and watch for the client leaving and the dashboard closing, which cancel the loop. No task group
    lives in a generator, so a client that leaves while a table is being written to it ends cleanly.
    """

    def __init__(self, board: Dashboard, base: str) -> None:
        super().__init__(media_type="text/event-stream")
        self._board = board
        self._base = base

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from micro.gateway.http import EventStream

        board = self._board
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(board.follow_registry)
                tg.start_soon(EventStream.watch, receive, tg.cancel_scope)
                tg.start_soon(self._until_closed, tg.cancel_scope)
                seen = board.registry_version
                while True:
                    await send({"type": "http.response.body", "body": await board.services_event(self._base),
                                "more_body": True})
                    with anyio.move_on_after(REFRESH):  # a change, or the nodes' health and call rates anew
                        await board.registry_changed(seen)
                        await anyio.sleep(0.05)  # fold a burst of changes (a system starting) into one table
                    seen = board.registry_version
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away mid-write

    async def _until_closed(self, scope: anyio.CancelScope) -> None:
        await self._board.until_closed()
        scope.cancel()
