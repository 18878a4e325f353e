"""The task and project services of the example system, with in-memory data.

Seeded so that ``micro call task Task.ListOverdue '{"user_id": "alice"}'`` returns
Alice's three overdue tasks, as in the Go Micro announcement's transcript.
"""

from __future__ import annotations

import datetime as dt
import itertools

import msgspec

import micro
from micro.errors import BadRequest, NotFound

# -- task -------------------------------------------------------------------------------------


class TaskRecord(msgspec.Struct):
    id: str
    title: str
    due: str  # ISO date
    assignee: str = ""
    project_id: str = ""
    status: str = "open"  # open | done


class ListOverdueRequest(msgspec.Struct):
    user_id: str
    as_of: str = ""  # ISO date; default: today


class ListOverdueResponse(msgspec.Struct):
    records: list[TaskRecord]
    total: int


class ListTasksRequest(msgspec.Struct):
    user_id: str = ""
    project_id: str = ""
    status: str = ""


class ListTasksResponse(msgspec.Struct):
    records: list[TaskRecord]
    total: int


class CreateTaskRequest(msgspec.Struct):
    title: str
    due: str
    assignee: str = ""
    project_id: str = ""


class UpdateTaskRequest(msgspec.Struct):
    id: str
    due: str = ""
    status: str = ""
    assignee: str = ""


class TaskResponse(msgspec.Struct):
    record: TaskRecord


class DeleteTaskRequest(msgspec.Struct):
    id: str


def _date(value: str, field: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{field}: {value!r} is not an ISO date (YYYY-MM-DD)") from None


SEED_TASKS = [
    TaskRecord("t1", "Write quarterly report", "2026-06-01", "alice", "p1"),
    TaskRecord("t2", "Review PR #42", "2026-06-02", "alice", "p1"),
    TaskRecord("t3", "Update deployment docs", "2026-06-03", "alice", "p2"),
    TaskRecord("t4", "Plan the offsite", "2026-06-04", "alice", "p2", status="done"),
    TaskRecord("t5", "Prepare launch checklist", "2099-01-15", "alice", "p2"),
    TaskRecord("t6", "Fix login bug", "2026-05-28", "bob", "p1"),
    TaskRecord("t7", "Write release notes", "2099-02-01", "bob", "p2"),
]


class Task:
    """Tasks: a title, a due date, an assignee, a status; each belongs to a project."""

    def __init__(self, tasks: list[TaskRecord] | None = None) -> None:
        seed = tasks if tasks is not None else [msgspec.structs.replace(t) for t in SEED_TASKS]
        self.tasks = {t.id: t for t in seed}
        self._ids = itertools.count(len(self.tasks) + 1)

    async def ListOverdue(self, req: ListOverdueRequest) -> ListOverdueResponse:
        """List the open tasks of a user that are past their due date (as of today, or as_of)."""
        today = _date(req.as_of, "as_of") if req.as_of else dt.date.today()
        records = sorted(
            (t for t in self.tasks.values()
             if t.assignee == req.user_id and t.status == "open" and _date(t.due, "due") < today),
            key=lambda t: t.due,
        )
        return ListOverdueResponse(records=records, total=len(records))

    async def List(self, req: ListTasksRequest) -> ListTasksResponse:
        """List tasks, filtered by assignee (user_id), project_id and status when given."""
        records = [
            t for t in self.tasks.values()
            if (not req.user_id or t.assignee == req.user_id)
            and (not req.project_id or t.project_id == req.project_id)
            and (not req.status or t.status == req.status)
        ]
        return ListTasksResponse(records=sorted(records, key=lambda t: t.due), total=len(records))

    async def Create(self, req: CreateTaskRequest) -> TaskResponse:
        """Create a task with a title, a due date (YYYY-MM-DD), an optional assignee and project."""
        _date(req.due, "due")
        task = TaskRecord(f"t{next(self._ids)}", req.title, req.due, req.assignee, req.project_id)
        self.tasks[task.id] = task
        return TaskResponse(record=task)

    async def Update(self, req: UpdateTaskRequest) -> TaskResponse:
        """Change a task's due date (reschedule), status (open/done) or assignee."""
        task = self.tasks.get(req.id)
        if task is None:
            raise NotFound(f"no task {req.id!r}")
        if req.due:
            _date(req.due, "due")
            task.due = req.due
        if req.status:
            if req.status not in ("open", "done"):
                raise BadRequest(f"status: {req.status!r} is not one of open, done")
            task.status = req.status
        if req.assignee:
            task.assignee = req.assignee
        return TaskResponse(record=task)

    async def Delete(self, req: DeleteTaskRequest) -> TaskResponse:
        """Delete a task for good (the task-mgr agent asks a person first)."""
        task = self.tasks.pop(req.id, None)
        if task is None:
            raise NotFound(f"no task {req.id!r}")
        return TaskResponse(record=task)


# -- project ----------------------------------------------------------------------------------


class ProjectRecord(msgspec.Struct):
    id: str
    name: str
    owner: str = ""


class CreateProjectRequest(msgspec.Struct):
    name: str
    owner: str = ""


class ProjectResponse(msgspec.Struct):
    record: ProjectRecord


class ListProjectsRequest(msgspec.Struct):
    owner: str = ""


class ListProjectsResponse(msgspec.Struct):
    records: list[ProjectRecord]


class GetProjectRequest(msgspec.Struct):
    id: str


class ProjectDetail(msgspec.Struct):
    record: ProjectRecord
    tasks: list[TaskRecord]


SEED_PROJECTS = [
    ProjectRecord("p1", "Website", "alice"),
    ProjectRecord("p2", "Launch", "alice"),
]


class Project:
    """Projects own tasks; a project's detail lists its tasks (from the task service)."""

    def __init__(self, service: micro.Service | None = None) -> None:
        self.projects = {p.id: msgspec.structs.replace(p) for p in SEED_PROJECTS}
        self._ids = itertools.count(len(self.projects) + 1)
        self.service = service  # its client (available once running) reaches the task service

    async def Create(self, req: CreateProjectRequest) -> ProjectResponse:
        """Create a project with a name and an optional owner."""
        project = ProjectRecord(f"p{next(self._ids)}", req.name, req.owner)
        self.projects[project.id] = project
        return ProjectResponse(record=project)

    async def List(self, req: ListProjectsRequest) -> ListProjectsResponse:
        """List projects, filtered by owner when given."""
        return ListProjectsResponse(
            records=[p for p in self.projects.values() if not req.owner or p.owner == req.owner]
        )

    async def Get(self, req: GetProjectRequest) -> ProjectDetail:
        """A project and its tasks."""
        project = self.projects.get(req.id)
        if project is None:
            raise NotFound(f"no project {req.id!r}")
        tasks: list[TaskRecord] = []
        if self.service is not None:
            rsp = await self.service.client.call(
                "task", "Task.List", ListTasksRequest(project_id=req.id), response_type=ListTasksResponse
            )
            tasks = rsp.records
        return ProjectDetail(record=project, tasks=tasks)


# -- milestone --------------------------------------------------------------------------------


class MilestoneRecord(msgspec.Struct):
    id: str
    project_id: str
    name: str
    due: str
    done: bool = False


class ListMilestonesRequest(msgspec.Struct):
    project_id: str = ""


class ListMilestonesResponse(msgspec.Struct):
    records: list[MilestoneRecord]


SEED_MILESTONES = [
    MilestoneRecord("m1", "p2", "Beta", "2026-06-15"),
    MilestoneRecord("m2", "p2", "General availability", "2026-07-01"),
    MilestoneRecord("m3", "p1", "Redesign live", "2026-05-20", done=True),
]


class Milestone:
    """Milestones track the progress of projects."""

    def __init__(self) -> None:
        self.milestones = {m.id: msgspec.structs.replace(m) for m in SEED_MILESTONES}

    async def List(self, req: ListMilestonesRequest) -> ListMilestonesResponse:
        """List milestones, of one project when project_id is given."""
        return ListMilestonesResponse(
            records=[m for m in self.milestones.values() if not req.project_id or m.project_id == req.project_id]
        )


# -- notification and email ---------------------------------------------------------------------


class SendNotificationRequest(msgspec.Struct):
    user_id: str
    message: str


class NotificationRecord(msgspec.Struct):
    id: str
    user_id: str
    message: str


class NotificationResponse(msgspec.Struct):
    record: NotificationRecord


class ListNotificationsRequest(msgspec.Struct):
    user_id: str = ""


class ListNotificationsResponse(msgspec.Struct):
    records: list[NotificationRecord]


class Notification:
    """In-app notifications to users."""

    def __init__(self) -> None:
        self.sent: list[NotificationRecord] = []

    async def Send(self, req: SendNotificationRequest) -> NotificationResponse:
        """Send an in-app notification to a user."""
        record = NotificationRecord(f"n{len(self.sent) + 1}", req.user_id, req.message)
        self.sent.append(record)
        return NotificationResponse(record=record)

    async def List(self, req: ListNotificationsRequest) -> ListNotificationsResponse:
        """List the notifications sent, to one user when user_id is given."""
        return ListNotificationsResponse(records=[n for n in self.sent if not req.user_id or n.user_id == req.user_id])


class SendEmailRequest(msgspec.Struct):
    to: str
    subject: str
    body: str = ""


class EmailRecord(msgspec.Struct):
    id: str
    to: str
    subject: str
    body: str = ""


class EmailResponse(msgspec.Struct):
    record: EmailRecord


class Email:
    """Outgoing email (kept in memory in this example)."""

    def __init__(self) -> None:
        self.outbox: list[EmailRecord] = []

    async def Send(self, req: SendEmailRequest) -> EmailResponse:
        """Send an email with a subject and a body to an address (or a user id)."""
        record = EmailRecord(f"e{len(self.outbox) + 1}", req.to, req.subject, req.body)
        self.outbox.append(record)
        return EmailResponse(record=record)


# -- user and workspace (the onboard-user flow) -------------------------------------------------


class CreateUserRequest(msgspec.Struct):
    name: str
    email: str


class UserRecord(msgspec.Struct):
    id: str
    name: str
    email: str


class UserResponse(msgspec.Struct):
    record: UserRecord


class User:
    """Users; creating one publishes events.user.created (the onboard-user flow's trigger)."""

    def __init__(self, service: micro.Service) -> None:
        self.service = service
        self.users: dict[str, UserRecord] = {}

    async def Create(self, req: CreateUserRequest) -> UserResponse:
        """Create a user with a name and an email address."""
        record = UserRecord(f"u{len(self.users) + 1}", req.name, req.email)
        self.users[record.id] = record
        await self.service.client.publish("events.user.created", record)
        return UserResponse(record=record)


class CreateWorkspaceRequest(msgspec.Struct):
    owner: str
    name: str = ""


class WorkspaceRecord(msgspec.Struct):
    id: str
    owner: str
    name: str


class WorkspaceResponse(msgspec.Struct):
    record: WorkspaceRecord


class ListWorkspacesRequest(msgspec.Struct):
    owner: str = ""


class ListWorkspacesResponse(msgspec.Struct):
    records: list[WorkspaceRecord]


class Workspace:
    """Workspaces: one per user, created when they join. Honours idempotency keys."""

    def __init__(self) -> None:
        self.workspaces: list[WorkspaceRecord] = []
        self._by_key: dict[str, WorkspaceRecord] = {}

    async def Create(self, req: CreateWorkspaceRequest) -> WorkspaceResponse:
        """Create a workspace for a user (owner is the user id or email)."""
        key = micro.context.metadata().get("idempotency-key", "")
        if key and key in self._by_key:  # a retried flow step: the workspace exists already
            return WorkspaceResponse(record=self._by_key[key])
        record = WorkspaceRecord(f"w{len(self.workspaces) + 1}", req.owner, req.name or f"{req.owner}'s workspace")
        self.workspaces.append(record)
        if key:
            self._by_key[key] = record
        return WorkspaceResponse(record=record)

    async def List(self, req: ListWorkspacesRequest) -> ListWorkspacesResponse:
        """List workspaces, of one owner when given."""
        return ListWorkspacesResponse(records=[w for w in self.workspaces if not req.owner or w.owner == req.owner])
