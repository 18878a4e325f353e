"""The example system: task and project services (agents and a flow join them as they land).

Run it with `make run` (or `micro run examples/tasks`), then from another terminal:

    micro services
    micro describe task
    micro call task Task.ListOverdue '{"user_id": "alice"}'
    micro call project Project.Get '{"id": "p1"}'
"""

from services import Project, Task

import micro

task = micro.New("task", metadata={"description": "tasks with assignees, due dates and status"})
task.handle(Task())

project = micro.New("project", metadata={"description": "projects that own tasks"})
project.handle(Project(project))
