"""The example system: seven services, three agents and two flows.

Run it with `make run` (or `micro run examples/tasks`), then from another terminal:

    micro services
    micro call task Task.ListOverdue '{"user_id": "alice"}'
    micro call task-mgr Agent.Chat '{"message": "What tasks are overdue for Alice?"}'
    micro agent list
    micro chat -m "Reschedule Alice's overdue tasks and notify her"
    micro chat --agent task-mgr -m "Delete task t7"      # waits for a person's approval
    micro chat --agent task-mgr -m "Delete tasks t5 and t6"   # two calls, approved (or denied) one by one
    micro agent pending task-mgr
    micro agent approve task-mgr RUN_ID                  # or --deny --reason "keep it"
    micro call user User.Create '{"name": "Dana", "email": "dana@example.com"}'   # triggers onboard-user
    micro flow runs onboard-user
    micro flow run close-task '{"task_id": "t2", "reason": "merged"}'   # waits for the lead's decision
    micro flow runs close-task --status waiting
    micro flow resume RUN_ID --input '{"approved": true, "note": "thanks!"}'
    micro flow show RUN_ID

Without ANTHROPIC_API_KEY the agents run on a scripted demo model (labelled as such). It
understands overdue, reschedule, notify, delete task tN, tasks, projects, milestones and email,
for alice or bob; anything else gets its list of tools.
"""

from typing import Any

import msgspec
from demo_model import model_for_example
from services import Email, Milestone, Notification, Project, Task, User, Workspace

import micro
from micro.flow import Await, Call, State

task = micro.New("task", metadata={"description": "tasks with assignees, due dates and status"})
task.handle(Task())

project = micro.New("project", metadata={"description": "projects that own tasks"})
project.handle(Project(project))

milestone = micro.New("milestone", metadata={"description": "milestones that track projects"})
milestone.handle(Milestone())

task_mgr = micro.NewAgent(
    "task-mgr",
    micro.AgentServices("task", "project"),
    micro.AgentPrompt("You manage tasks and projects. You understand deadlines, priorities, and assignments."),
    provider=model_for_example(),
    needs_approval=["task_Task_Delete"],  # deleting a task waits for a person: micro agent approve task-mgr RUN
)

project_mgr = micro.NewAgent(
    "project-mgr",
    micro.AgentServices("task", "project", "milestone"),
    micro.AgentPrompt("You manage the project system. Tasks belong to projects. Milestones track progress."),
    provider=model_for_example(),
)

notification = micro.New("notification", metadata={"description": "in-app notifications"})
notification.handle(Notification())

email = micro.New("email", metadata={"description": "outgoing email"})
email.handle(Email())

comms_mgr = micro.NewAgent(
    "comms-mgr",
    micro.AgentServices("notification", "email"),
    micro.AgentPrompt("You handle notifications and emails."),
    provider=model_for_example(),
)

user = micro.New("user", metadata={"description": "users; publishes events.user.created"})
user.handle(User(user))

workspace = micro.New("workspace", metadata={"description": "a workspace per user"})
workspace.handle(Workspace())

onboard_user = micro.NewFlow(
    "onboard-user",
    micro.FlowTrigger("events.user.created"),
    micro.FlowPrompt("New user created: {data}. Send a welcome email and create their workspace."),
    micro.FlowServices("email", "workspace"),
    provider=model_for_example(),
)


class CloseDecision(msgspec.Struct):
    """What the lead answers when a task is to be closed."""

    approved: bool
    note: str = ""


def approved(state: State) -> dict[str, Any]:
    """Go on only if the lead approved (a refusal ends the run as failed, naming this step)."""
    if not state["lead"]["approved"]:
        raise micro.errors.BadRequest(f"the lead did not approve closing task {state.event['task_id']}: "
                                      f"{state['lead']['note'] or 'no reason given'}")
    return {"task_id": state.event["task_id"]}


close_task = micro.NewFlow(  # a stepped flow: it waits for a person, durably, then acts
    "close-task",
    trigger="events.task.close_requested",
    steps=[
        Await("lead", prompt="Close task {task_id} ({reason})?", timeout="2d", schema=CloseDecision),
        approved,
        Call("task", "Task.Update", name="closed", request={"id": "{task_id}", "status": "done"}),
        Call("notification", "Notification.Send", name="notified",
             request={"user_id": "{closed.record.assignee}",
                      "message": "Your task {closed.record.title} was closed: {lead.note}"}),
    ],
)
