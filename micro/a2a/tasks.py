"""A2A tasks are micro runs: the mapping between run records and the protocol's tasks, messages and cards.

=====================================  =======================================================
micro                                  A2A (protocol v1.0, the ``a2a-sdk`` protobuf types)
=====================================  =======================================================
run id                                 task id (the gateway names the run: ``ChatRequest.run_id``)
session                                context id
``running``                            ``TASK_STATE_WORKING``
``paused`` / ``input_required``        ``TASK_STATE_INPUT_REQUIRED`` (the status message says
                                       what it waits for; a data part lists the pending calls)
``interrupted``                        ``TASK_STATE_WORKING`` (its process died; ``micro agent
                                       resume --interrupted`` continues it), said in the message
``completed``                          ``TASK_STATE_COMPLETED``; the reply is the ``reply`` artifact
``failed`` / ``expired``               ``TASK_STATE_FAILED``, the error in the status message
``cancelled``                          ``TASK_STATE_CANCELED``
the run's user / assistant text        the task's history (user / agent messages)
=====================================  =======================================================

Nothing here does I/O: :mod:`micro.gateway.a2a` reads the records through the agents'
``AgentInfo.Run`` / ``AgentInfo.Runs`` endpoints and maps them with these functions, and maps a
message back: its text (:func:`message_content`) and, on a task that waits, the resume it asks
for (:func:`resume_request`: ``approve``, ``deny: reason``, data-part decisions, an answer).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from micro.agent.record import AgentRun, PendingCall
from micro.registry import ServiceRecord

try:
    from a2a.types import a2a_pb2 as pb
    from a2a.utils import errors as a2a_errors
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("A2A needs the a2a-sdk: pip install 'micro[a2a]'", name=exc.name) from exc

REPLY_ARTIFACT = "reply"
"""The id of the artifact that holds an agent's reply (streamed in chunks, whole in the task)."""

STATE: dict[str, int] = {
    "running": pb.TASK_STATE_WORKING,
    "waiting": pb.TASK_STATE_WORKING,
    "interrupted": pb.TASK_STATE_WORKING,
    "paused": pb.TASK_STATE_INPUT_REQUIRED,
    "input_required": pb.TASK_STATE_INPUT_REQUIRED,
    "completed": pb.TASK_STATE_COMPLETED,
    "failed": pb.TASK_STATE_FAILED,
    "expired": pb.TASK_STATE_FAILED,
    "cancelled": pb.TASK_STATE_CANCELED,
}
"""The A2A task state of each run status."""

STATUSES_OF: dict[int, tuple[str, ...]] = {
    pb.TASK_STATE_WORKING: ("running", "waiting", "interrupted"),
    pb.TASK_STATE_INPUT_REQUIRED: ("paused", "input_required"),
    pb.TASK_STATE_COMPLETED: ("completed",),
    pb.TASK_STATE_FAILED: ("failed", "expired"),
    pb.TASK_STATE_CANCELED: ("cancelled",),
}
"""The run statuses of each A2A task state (``tasks/list``'s status filter)."""

FINAL_STATES = frozenset({pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED, pb.TASK_STATE_CANCELED,
                          pb.TASK_STATE_REJECTED})
"""Task states after which nothing more happens to a task."""


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def text_part(text: str) -> pb.Part:
    return pb.Part(text=text)


def data_part(value: Any) -> pb.Part:
    part = pb.Part(media_type="application/json")
    part.data.CopyFrom(_value(value))
    return part


def _value(value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    # through JSON: the protobuf Value's own mapping of dicts, lists, numbers, strings, bools and null
    json_format.Parse(json.dumps(value), v)
    return v


def agent_message(task_id: str, context_id: str, parts: Sequence[pb.Part], message_id: str) -> pb.Message:
    return pb.Message(message_id=message_id, task_id=task_id, context_id=context_id, role=pb.ROLE_AGENT,
                      parts=list(parts))


def waiting_message(pending: Sequence[PendingCall]) -> tuple[str, list[dict[str, Any]]]:
    """What a waiting run asks of the person, in words, and its pending calls as data."""
    lines = []
    for p in pending:
        if p.kind == "question":
            lines.append(p.question)
        else:
            why = f" ({p.reason})" if p.reason else ""
            lines.append(f"Approve {p.tool}({json.dumps(p.input, ensure_ascii=False)})?{why}")
    approvals = [p for p in pending if p.kind == "approval"]
    if approvals:
        lines.append('Reply "approve", or "deny: <reason>" (or a data part {"approve": true|false, "reason": "…"}; '
                     '{"decisions": {"<call_id>": true|false|"<reason>"}} decides each call).')
    data = [{"call_id": p.call_id, "tool": p.tool, "input": p.input, "kind": p.kind,
             **({"question": p.question} if p.kind == "question" else {"reason": p.reason})} for p in pending]
    return "\n".join(lines), data


def status_of(run: AgentRun) -> pb.TaskStatus:
    """The task status of a run: its state, and a message when it waits, failed or was interrupted."""
    state = STATE.get(run.status, pb.TASK_STATE_UNSPECIFIED)
    status = pb.TaskStatus(state=state)  # type: ignore[arg-type]
    if run.updated or run.started:
        status.timestamp.CopyFrom(timestamp(run.updated or run.started))
    parts: list[pb.Part] = []
    if run.status in ("paused", "input_required"):
        text, data = waiting_message(run.pending)
        parts = [text_part(text), data_part({"pending": data})]
    elif run.status in ("failed", "expired", "cancelled") and run.error:
        parts = [text_part(run.error)]
    elif run.status == "interrupted":
        parts = [text_part(f"the process running this task stopped; continue it with: micro agent resume "
                           f"{run.agent} --interrupted")]
    if parts:
        status.message.CopyFrom(agent_message(run.id, run.session, parts, f"{run.id}-status-{run.resumes}"))
    return status


def history_of(run: AgentRun) -> list[pb.Message]:
    """The run's user and assistant text, as the task's history."""
    out = []
    for i, m in enumerate(run.messages):
        text = m.text
        if not text or m.role not in ("user", "assistant"):
            continue
        role = pb.ROLE_USER if m.role == "user" else pb.ROLE_AGENT
        out.append(pb.Message(message_id=f"{run.id}-{i}", task_id=run.id, context_id=run.session,
                              role=role, parts=[text_part(text)]))
    if not out and run.message:
        out.append(pb.Message(message_id=f"{run.id}-0", task_id=run.id, context_id=run.session,
                              role=pb.ROLE_USER, parts=[text_part(run.message)]))
    return out


def task_of(run: AgentRun, *, history_length: int | None = None, artifacts: bool = True) -> pb.Task:
    """The A2A task that is ``run``."""
    task = pb.Task(id=run.id, context_id=run.session, status=status_of(run))
    history = history_of(run)
    if history_length is not None:
        history = history[-history_length:] if history_length > 0 else []
    task.history.extend(history)
    if artifacts and run.status == "completed":
        task.artifacts.append(pb.Artifact(artifact_id=REPLY_ARTIFACT, name=REPLY_ARTIFACT,
                                          parts=[text_part(run.reply)]))
    task.metadata.CopyFrom(struct({"micro": {"agent": run.agent, "run_status": run.status,
                                             "tool_calls": len(run.tool_calls)}}))
    return task


# -- messages ---------------------------------------------------------------------------------------

_APPROVE = frozenset({"approve", "approved", "yes", "y", "ok", "allow"})
_DENY = frozenset({"deny", "denied", "no", "n", "reject", "refuse"})


def message_content(message: pb.Message) -> tuple[str, list[Any]]:
    """The text of a message and its data parts; a part that is not text refuses the message."""
    if not message.parts:
        raise a2a_errors.InvalidParamsError(message="the message has no parts: send a text part")
    texts: list[str] = []
    data: list[Any] = []
    for i, part in enumerate(message.parts):
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data":
            value = json_format.MessageToDict(part.data)
            data.append(value)
            texts.append(json.dumps(value, ensure_ascii=False))
        elif kind == "raw" and (part.media_type.startswith("text/") or part.media_type == "application/json"):
            try:
                texts.append(part.raw.decode())
            except UnicodeDecodeError:
                raise a2a_errors.ContentTypeNotSupportedError(
                    message=f"part {i} ({part.media_type}) is not UTF-8 text") from None
        else:
            what = f"a file ({part.media_type or 'no media type'})" if kind in ("raw", "url") else "empty"
            raise a2a_errors.ContentTypeNotSupportedError(
                message=f"part {i} is {what}: micro's agents take text parts, text files and JSON data parts")
    return "\n".join(texts), data


_DENIAL = re.compile(r"(?is)\s*(" + "|".join(sorted(_DENY, key=len, reverse=True)) + r")(?![\w'-])[\s:,.;!-]*(.*)")


def approval_of(text: str) -> bool | str | None:
    """What a text reply decides on a task's approvals: True to approve, a reason (maybe empty) to deny,
    None if it is neither.

    Only a reply that is wholly an approve word approves ("yes", "OK.", "approve!"): one that says more
    ("yes, but only t5", "ok but wait until Monday", "approve: not t6") is not a plain yes, and is refused
    rather than taken as one. A deny word may be followed by its reason ("deny: too risky", "no, not now").
    """
    if text.strip().lower().rstrip(".!,;: ") in _APPROVE:
        return True
    denied = _DENIAL.fullmatch(text)
    if denied is not None:
        return denied.group(2).strip()
    return None


def resume_request(run: AgentRun, text: str, data: list[Any]) -> dict[str, Any]:
    """The ``Agent.StreamResume`` request a message on a waiting task makes (``InvalidParams`` if unclear)."""
    where = f"task {run.id} waits for {run.waits_for()}"
    questions = [p for p in run.pending if p.kind == "question"]
    approvals = [p for p in run.pending if p.kind == "approval"]
    decided = next((d for d in data if isinstance(d, dict) and ({"approve", "decisions", "answers"} & d.keys())), None)
    if decided is not None:
        out: dict[str, Any] = {"run_id": run.id, "reason": str(decided.get("reason", ""))}
        if "approve" in decided:
            if not isinstance(decided["approve"], bool):
                raise a2a_errors.InvalidParamsError(message=f"{where}; `approve` must be true or false")
            out["approve_all" if decided["approve"] else "deny_all"] = True
        decisions = []
        for call_id, verdict in dict(decided.get("decisions") or {}).items():
            if isinstance(verdict, bool):
                decisions.append({"call_id": call_id, "approve": verdict})
            elif isinstance(verdict, str) and verdict:
                decisions.append({"call_id": call_id, "approve": False, "reason": verdict})
            else:
                raise a2a_errors.InvalidParamsError(
                    message=f"{where}; the decision on {call_id!r} must be true, false or a reason (text)")
        for call_id, answer in dict(decided.get("answers") or {}).items():
            decisions.append({"call_id": call_id, "answer": str(answer)})
        out["decisions"] = decisions
        return out
    if questions and not approvals:
        if not text.strip():
            raise a2a_errors.InvalidParamsError(message=f"{where}; the answer is empty")
        return {"run_id": run.id, "answer": text}
    if approvals and not questions:
        verdict = approval_of(text)
        if verdict is True:
            return {"run_id": run.id, "approve_all": True}
        if verdict is not None:
            return {"run_id": run.id, "deny_all": True, "reason": verdict}
    raise a2a_errors.InvalidParamsError(
        message=f'{where}; reply "approve" or "deny: <reason>" to decide its approvals, the answer text to its '
                'question, or a data part {"approve": true|false, "reason": "…"}, {"decisions": {"<call_id>": '
                'true|false|"<reason>"}, "answers": {"<call_id>": "<text>"}}')


# -- cards --------------------------------------------------------------------------------------


BEARER = "bearer"
"""The name of the card's security scheme when the gateway has a token."""


def card_of(agent: ServiceRecord, services: Sequence[ServiceRecord], url: str, version: str, *,
            token: bool) -> pb.AgentCard:
    """The Agent Card of ``agent`` (a registry record of ``type=agent``) served at ``url``.

    Its skills are the endpoints of the ``services`` it manages (streaming ones left out, as
    an agent leaves them out of its tools); with ``token``, the card declares the bearer scheme.
    """
    summary = agent.metadata.get("prompt", "")
    managed = [s for s in agent.metadata.get("services", "").split(",") if s]
    description = summary or f"The {agent.name} agent of a micro system."
    if managed:
        description += f" It manages: {', '.join(managed)}."
    card = pb.AgentCard(
        name=agent.name, description=description, version=version,
        supported_interfaces=[pb.AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0"),
                              pb.AgentInterface(url=f"{url}/rest", protocol_binding="HTTP+JSON",
                                                protocol_version="1.0")],
        capabilities=pb.AgentCapabilities(streaming=True),
        default_input_modes=["text/plain", "application/json"], default_output_modes=["text/plain"],
        provider=pb.AgentProvider(organization="micro", url=url),
    )
    seen = set()
    for rec in services:
        for ep in rec.endpoints:
            skill_id = f"{rec.name}.{ep.name}"
            if ep.streaming or skill_id in seen:
                continue
            seen.add(skill_id)
            card.skills.append(pb.AgentSkill(id=skill_id, name=f"{rec.name} {ep.name}",
                                             description=ep.description or f"{ep.name} of the {rec.name} service",
                                             tags=[rec.name]))
    if not card.skills:  # an agent with no services still does something: it answers
        card.skills.append(pb.AgentSkill(id="chat", name="chat", description=description, tags=["chat"]))
    if token:
        card.security_schemes[BEARER].http_auth_security_scheme.CopyFrom(
            pb.HTTPAuthSecurityScheme(scheme="Bearer", description="the gateway's token (micro a2a --token-env)"))
        req = card.security_requirements.add()
        req.schemes[BEARER].SetInParent()
    return card
