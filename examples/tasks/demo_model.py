"""The key-free demo model: a scripted stand-in for Claude, clearly labelled as such.

It is not intelligent. It recognises a few requests ("overdue", "tasks", "projects",
"milestones"), calls the matching tool, and summarises the JSON that comes back,
so the example system can be tried end to end without an API key. With
``ANTHROPIC_API_KEY`` set, the example uses Claude instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

from micro.ai import Message, Model, ToolResultBlock, ToolSpec, ToolUseBlock, from_provider, scripted

LABEL = "scripted demo model (set ANTHROPIC_API_KEY to use Claude)"
USERS = ("alice", "bob")
PHRASES = ("overdue", "reschedule", "notify", "delete task tN", "tasks", "projects", "milestones", "email")
"""What the demo model understands: a message with one of these (tN: a task id such as t7), for alice or bob.
Anything else gets its list of tools. The README and the app's docstring (printed by micro run) list them."""


def model_for_example() -> Model:
    """Claude when ``ANTHROPIC_API_KEY`` is set, the labelled demo model otherwise."""
    if os.environ.get("ANTHROPIC_API_KEY"):
        return from_provider("anthropic")
    demo = scripted.function(_brain)
    demo.model = LABEL
    return demo


def _brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    last = messages[-1]
    results = [b for b in last.content if isinstance(b, ToolResultBlock)]
    asked = [b for b in messages[-2].content if isinstance(b, ToolUseBlock)] if results else []
    request = next(m.text for m in reversed(messages) if m.role == "user" and m.text).lower()
    names = {t.name for t in tools}
    user = next((u for u in USERS if u in request), "alice")
    if results and "reschedule" in request and asked and asked[0].name == "task_Task_ListOverdue":
        overdue = json.loads(results[0].content).get("records", [])
        new_due = (dt.date.today() + dt.timedelta(days=7)).isoformat()
        calls = [scripted.call("task_Task_Update", id=r["id"], due=new_due) for r in overdue]
        if calls:  # one turn, several calls: they run concurrently
            return scripted.turn(f"Moving {_count(len(calls), 'task')} to {new_due}...", *calls)
    if results:
        return "\n\n".join(_summary(use, res) for use, res in zip(asked, results, strict=False))
    task_ids = [w for w in request.replace(".", " ").replace(",", " ").split() if w[:1] == "t" and w[1:].isdigit()]
    if "delete" in request and task_ids and "task_Task_Delete" in names:
        deletes = [scripted.call("task_Task_Delete", id=t) for t in task_ids]  # several: one turn, each approved
        return scripted.turn(f"Deleting task {', '.join(task_ids)}...", *deletes)
    if request.startswith("new user created") and "email_Email_Send" in names:
        event = json.loads(request.split(":", 1)[1].rsplit(". ", 1)[0]) if ":" in request else {}
        who = event.get("email") or event.get("name", "the new user")
        return scripted.turn(
            "Welcoming the new user...",
            scripted.call("email_Email_Send", to=who, subject="Welcome!", body="Your workspace is ready."),
            scripted.call("workspace_Workspace_Create", owner=event.get("id", who)),
        )
    if "notif" in request and "notification_Notification_Send" in names:
        note = "Your overdue tasks were rescheduled." if "reschedule" in request else request
        return scripted.turn(f"Notifying {user.title()}...",
                             scripted.call("notification_Notification_Send", user_id=user, message=note))
    for word, tool, args, say in (
        ("reschedule", "task_Task_ListOverdue", {"user_id": user}, "Finding overdue tasks..."),
        ("overdue", "task_Task_ListOverdue", {"user_id": user}, "Checking overdue tasks..."),
        ("milestone", "milestone_Milestone_List", {}, "Checking milestones..."),
        ("project", "project_Project_List", {}, "Checking projects..."),
        ("task", "task_Task_List", {"user_id": user}, "Checking tasks..."),
        ("email", "email_Email_Send", {"to": user, "subject": "Hello from micro"}, "Sending an email..."),
    ):
        if word in request and tool in names:
            return scripted.turn(say, scripted.call(tool, args))
    listing = ", ".join(sorted(names)) or "none"
    return f"[{LABEL}] I only understand a few requests in this demo. My tools: {listing}."


def _summary(use: ToolUseBlock, res: ToolResultBlock) -> str:
    if res.is_error:
        return f"{use.name} failed: {res.content}"
    try:
        body: Any = json.loads(res.content)
    except ValueError:
        return res.content
    if use.name == "task_Task_Update":
        return f"Rescheduled: {_label(body['record'])}"
    if use.name == "task_Task_Delete":
        return f"Deleted: {_label(body['record'])}"
    if use.name == "email_Email_Send":
        return f"Emailed {body['record']['to']}: {body['record']['subject']}"
    if use.name == "workspace_Workspace_Create":
        return f"Created workspace {body['record']['id']} for {body['record']['owner']}"
    if use.name == "notification_Notification_Send":
        return f"Notified {body['record']['user_id'].title()}: {body['record']['message']}"
    records = body.get("records") if isinstance(body, dict) else None
    if not isinstance(records, list):
        return json.dumps(body)
    if use.name == "task_Task_ListOverdue":
        who = str(use.input.get("user_id", "")).title()
        head = f"{who} has {_count(len(records), 'overdue task')}" + (":" if records else ".")
    else:
        head = f"Found {len(records)}:"
    lines = [f"{i}. {_label(r)}" for i, r in enumerate(records, 1)]
    return "\n".join([head, *lines])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _label(r: dict[str, Any]) -> str:
    name = r.get("title") or r.get("name") or r.get("id")
    due = r.get("due")
    if isinstance(due, str):
        try:
            d = dt.date.fromisoformat(due)
            return f"{name} (due {d:%B} {d.day})"
        except ValueError:
            pass
    return str(name)
