"""Delegation: the built-in ``delegate(agent, message)`` tool of an agent that may ask others.

``NewAgent("task-mgr", ..., agents=["comms-mgr"])`` gives the agent a
``delegate`` tool whose ``agent`` argument is one of those names. Calling it
sends ``message`` to that agent's ``Agent.Chat`` over RPC, with ``parent_id``
set to the current run's id, so the child's run record (and trace) points at
the parent's. The result the model sees is the other agent's reply.

The chain of agents above a run travels in the ``micro-delegation`` call
metadata. A delegation is refused with a tool error the model can read (and
answer around) when the target is already in the chain (a cycle: A → B → A)
or when the chain is ``max_depth`` agents long.

An entry of ``agents`` that is an ``http(s)://`` URL is a **remote A2A agent** (any
Agent2Agent v1.0 server, micro's gateway or not), asked through
:class:`micro.a2a.Client` (the ``a2a`` extra): streaming when its card offers it, in
the context ``{agent}-{run id}`` (one conversation per run). Its card's description
joins the tool's description when the agent starts. What comes back:

- a completed task: its reply (the artifacts' text), as for a local agent;
- a task that needs input: the remote agent's question becomes **this run's own**
  (``input_required``, via :class:`~micro.agent.tools.AskPerson`, which keeps the remote
  task's id with the pending call); the person's answer is sent on that task, and what it
  answers then is the call's result;
- a failed, rejected or cancelled task, or an unreachable agent: a tool error the model
  reads (and can answer around).

No metadata of the caller's (tokens included) goes to a remote agent: A2A carries only
the message, and the headers configured for that URL (``Agent(remote_headers={url: {...}})``,
e.g. the partner's own token).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from micro import context, idempotency
from micro.errors import BadRequest, Conflict, Internal, PermissionDenied

from .tools import RUN_ID, AskPerson, Tool, forwarded

log = logging.getLogger("micro.agent")

CHAIN = "micro-delegation"
"""Call metadata: the agents above the current run, outermost first, comma-separated."""

DEFAULT_MAX_DEPTH = 3


class DelegateArgs(msgspec.Struct, forbid_unknown_fields=True):
    agent: str
    message: str


def is_remote(agent: str) -> bool:
    """Whether an ``agents=[…]`` entry is a remote A2A agent (an ``http(s)://`` URL)."""
    return agent.startswith(("http://", "https://"))


def delegate_tool(client: Callable[[], Any], me: str, agents: Sequence[str], *, max_depth: int = DEFAULT_MAX_DEPTH,
                  forward: Sequence[str] = (), timeout: float | None = None,
                  remote: Mapping[str, str] | None = None,
                  remote_headers: Mapping[str, Mapping[str, str]] | None = None) -> Tool:
    """The ``delegate`` tool of agent ``me``, able to ask any of ``agents`` (``client()`` gives the client).

    ``remote`` maps the URLs among ``agents`` to their cards' descriptions (for the model);
    ``remote_headers`` to the HTTP headers sent to each (its credentials: nothing else is sent).
    """
    headers = dict(remote_headers or {})
    names = sorted(set(agents))
    local = [n for n in names if not is_remote(n)]
    urls = [n for n in names if is_remote(n)]
    schema: dict[str, Any] = {
        "type": "object",
        "title": "delegate",
        "properties": {
            "agent": {"type": "string", "enum": names, "description": "the agent to ask (its name, or its URL)"},
            "message": {"type": "string", "description": "what to ask it, with everything it needs to know"},
        },
        "required": ["agent", "message"],
        "additionalProperties": False,
    }

    def checked(args: dict[str, Any]) -> DelegateArgs:
        try:
            req = msgspec.convert(args, DelegateArgs)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"tool delegate: {exc}") from None
        if req.agent not in names:
            raise BadRequest(f"tool delegate: {me} may not ask {req.agent!r}; it may ask: {', '.join(names)}")
        if not req.message.strip():
            raise BadRequest("tool delegate: `message` is empty; say what the other agent should do")
        return req

    async def run(args: dict[str, Any]) -> Any:
        req = checked(args)
        md = context.metadata()
        chain = [a for a in md.get(CHAIN, "").split(",") if a] + [me]
        path = " → ".join([*chain, req.agent])
        if req.agent in chain:
            raise PermissionDenied(f"delegation refused: {path} is a cycle; answer with what you have")
        if len(chain) >= max_depth:
            raise PermissionDenied(f"delegation refused: {path} is deeper than the limit of {max_depth} agents; "
                                   "answer with what you have")
        if is_remote(req.agent):
            return await _remote(req.agent, me, req.message, md.get(RUN_ID, ""), timeout, headers.get(req.agent))
        metadata = {**forwarded(forward), CHAIN: ",".join(chain)}
        request = {"message": req.message, "parent_id": md.get(RUN_ID, ""), "session": f"from-{me}"}
        key = idempotency.current_key()
        if key:  # a delegation re-issued after a crash is answered by the other agent from its store
            metadata[idempotency.KEY] = idempotency.derived_key(key, req.agent, "Agent.Chat", request)
        rsp = await client().call(req.agent, "Agent.Chat", request, metadata=metadata, timeout=timeout)
        out = {"agent": req.agent, "reply": rsp["reply"], "run_id": rsp["run_id"]}
        status = rsp.get("status", "completed")
        if status and status != "completed":  # the other agent waits for a person: say so, and for what
            out["status"] = status
            out["pending"] = rsp.get("pending", [])
        return out

    async def answer(args: dict[str, Any], text: str, state: dict[str, Any]) -> Any:
        req = checked(args)
        if not is_remote(req.agent):
            return text
        task_id = state.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise Conflict(f"remote agent {req.agent}: this call's record keeps no remote task id to answer on; "
                           "ask it again")
        return await _remote(req.agent, me, text, context.metadata().get(RUN_ID, ""), timeout, headers.get(req.agent),
                             task_id=task_id)

    described = []
    if local:
        described.append(f"Agents you can ask: {', '.join(local)}.")
    if urls:
        cards = remote or {}
        described.append("Remote agents (A2A), asked by URL: " + "; ".join(
            f"{u}" + (f" ({cards[u]})" if cards.get(u) else "") for u in urls) + ".")
    return Tool(
        name="delegate",
        description=("Ask another agent to do part of the work in its own domain and return its answer. "
                     + " ".join(described)),
        input_schema=schema,
        run=run,
        answer=answer if urls else None,
    )


MAX_CARD_SUMMARY = 300
"""Characters of a remote agent's card (its name and description) that join the ``delegate`` tool's description."""


def card_summary(name: str, description: str) -> str:
    """What the model is told of a remote agent: ``name: description`` on one line, without control
    characters, cut to :data:`MAX_CARD_SUMMARY` characters (the card is the remote party's text, and
    it goes into this agent's prompt)."""
    text = f"{name}: {description}" if description else name
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= MAX_CARD_SUMMARY else text[:MAX_CARD_SUMMARY - 1] + "…"


async def describe_remote(urls: Sequence[str], *, timeout: float = 10.0,
                          headers: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, str]:
    """The card descriptions of remote A2A agents, fetched concurrently (an unreachable one is left out)."""
    import anyio

    from micro.a2a.client import card

    found: dict[str, str] = {}

    async def one(url: str) -> None:
        try:
            with anyio.fail_after(timeout):
                c = await card(url, headers=(headers or {}).get(url))
        except Exception as exc:  # the agent still starts; the model sees the URL without a description
            log.warning("remote agent %s: its card could not be read (%s); the model sees only its URL", url, exc)
            return
        found[url] = card_summary(c.name, c.description)

    async with anyio.create_task_group() as tg:
        for url in urls:
            tg.start_soon(one, url)
    return found


async def _remote(url: str, me: str, message: str, run_id: str, timeout: float | None,
                  headers: Mapping[str, str] | None, *, task_id: str = "") -> dict[str, Any]:
    """Ask the A2A agent at ``url`` (or, with ``task_id``, answer the question that task asked); its reply,
    or :class:`AskPerson` for its question (with the task's id as its state, to answer on)."""
    from a2a.types import a2a_pb2 as pb

    from micro.a2a.client import Client, text_of

    context_id = f"{me}-{run_id}" if run_id else f"from-{me}"
    async with Client(url, headers=headers, timeout=timeout or 300.0) as agent:
        if agent.card.capabilities.streaming:
            result: pb.Task | pb.Message = await _streamed(agent, message, context_id, task_id)
        else:
            result = await agent.send(message, context_id=context_id, task_id=task_id)
    if isinstance(result, pb.Message):
        return {"agent": url, "reply": text_of(result)}
    state = result.status.state
    said = text_of(result)
    if state == pb.TASK_STATE_COMPLETED:
        return {"agent": url, "reply": said, "task_id": result.id}
    if state in (pb.TASK_STATE_INPUT_REQUIRED, pb.TASK_STATE_AUTH_REQUIRED):
        raise AskPerson(f"{url} asks: {text_of(result.status) or 'it needs more input'}", {"task_id": result.id})
    name = pb.TaskState.Name(state).removeprefix("TASK_STATE_").lower()
    raise Internal(f"remote agent {url} ended task {result.id} as {name}: {text_of(result.status) or 'no reason'}")


async def _streamed(agent: Any, message: str, context_id: str, task_id: str) -> Any:
    """The task a stream ends with: its snapshot, with the status and artifact updates applied."""
    from a2a.types import a2a_pb2 as pb

    task = pb.Task(id=task_id, context_id=context_id)
    async for ev in agent.stream(message, context_id=context_id, task_id=task_id):
        if ev.HasField("message"):
            return ev.message
        if ev.HasField("task"):
            task.CopyFrom(ev.task)
        elif ev.HasField("status_update"):
            task.status.CopyFrom(ev.status_update.status)
        elif ev.HasField("artifact_update"):
            up = ev.artifact_update
            same = next((a for a in task.artifacts if a.artifact_id == up.artifact.artifact_id), None)
            if same is not None and up.append:
                same.parts.extend(up.artifact.parts)
            elif same is not None:
                same.CopyFrom(up.artifact)
            else:
                task.artifacts.append(up.artifact)
    return task
