"""The example system: task, project, milestone, notification and email services; three agents.

Run it with `make run` (or `micro run examples/tasks`), then from another terminal:

    micro services
    micro call task Task.ListOverdue '{"user_id": "alice"}'
    micro call task-mgr Agent.Chat '{"message": "What tasks are overdue for Alice?"}'
    micro agent list
    micro chat -m "Reschedule Alice's overdue tasks and notify her"

Without ANTHROPIC_API_KEY the agents run on a scripted demo model (labelled as such).
"""

from demo_model import model_for_example
from services import Email, Milestone, Notification, Project, Task

import micro

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
