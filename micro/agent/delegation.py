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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from micro import context, idempotency
from micro.errors import BadRequest, PermissionDenied

from .tools import RUN_ID, Tool, forwarded

CHAIN = "micro-delegation"
"""Call metadata: the agents above the current run, outermost first, comma-separated."""

DEFAULT_MAX_DEPTH = 3


class DelegateArgs(msgspec.Struct, forbid_unknown_fields=True):
    agent: str
    message: str


def delegate_tool(client: Callable[[], Any], me: str, agents: Sequence[str], *, max_depth: int = DEFAULT_MAX_DEPTH,
                  forward: Sequence[str] = (), timeout: float | None = None) -> Tool:
    """The ``delegate`` tool of agent ``me``, able to ask any of ``agents`` (``client()`` gives the client)."""
    names = sorted(set(agents))
    schema: dict[str, Any] = {
        "type": "object",
        "title": "delegate",
        "properties": {
            "agent": {"type": "string", "enum": names, "description": "the agent to ask"},
            "message": {"type": "string", "description": "what to ask it, with everything it needs to know"},
        },
        "required": ["agent", "message"],
        "additionalProperties": False,
    }

    async def run(args: dict[str, Any]) -> Any:
        try:
            req = msgspec.convert(args, DelegateArgs)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"tool delegate: {exc}") from None
        if req.agent not in names:
            raise BadRequest(f"tool delegate: {me} may not ask {req.agent!r}; it may ask: {', '.join(names)}")
        if not req.message.strip():
            raise BadRequest("tool delegate: `message` is empty; say what the other agent should do")
        md = context.metadata()
        chain = [a for a in md.get(CHAIN, "").split(",") if a] + [me]
        path = " → ".join([*chain, req.agent])
        if req.agent in chain:
            raise PermissionDenied(f"delegation refused: {path} is a cycle; answer with what you have")
        if len(chain) >= max_depth:
            raise PermissionDenied(f"delegation refused: {path} is deeper than the limit of {max_depth} agents; "
                                   "answer with what you have")
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

    return Tool(
        name="delegate",
        description=("Ask another agent to do part of the work in its own domain and return its answer. "
                     f"Agents you can ask: {', '.join(names)}."),
        input_schema=schema,
        run=run,
    )
