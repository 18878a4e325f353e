"""micro inside a Starlette (or FastAPI) app: the services, agent and flow start and stop with its lifespan.

Run it with any ASGI server, e.g. ``uvicorn starlette_app:app`` from this directory; then
``GET /overdue/alice`` calls the task service and ``POST /ask`` asks the agent. Other
processes see ``task`` and ``task-mgr`` in the registry as usual (``micro services``).
FastAPI takes the same ``lifespan=`` argument: ``FastAPI(lifespan=lifespan)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import micro


class ListOverdueRequest(msgspec.Struct):
    user_id: str


class ListOverdueResponse(msgspec.Struct):
    records: list[str]
    total: int


class Task:
    async def ListOverdue(self, req: ListOverdueRequest) -> ListOverdueResponse:
        """List the overdue tasks of a user."""
        records = {"alice": ["Write quarterly report"]}.get(req.user_id, [])
        return ListOverdueResponse(records, len(records))


task = micro.New("task")  # constructing does no I/O: safe at import time
task.handle(Task())
task_mgr = micro.NewAgent("task-mgr", services=["task"], prompt="You manage tasks.", provider="scripted")
onboard = micro.NewFlow("onboard", trigger="events.user.created", services=["task"], provider="scripted",
                        prompt="New user: {data}.")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with task, task_mgr, onboard:  # registered and serving while the web app runs; stopped after it
        yield


async def overdue(request: Request) -> JSONResponse:
    rsp = await task.client.call("task", "Task.ListOverdue", {"user_id": request.path_params["user"]})
    return JSONResponse(rsp)


async def ask(request: Request) -> JSONResponse:
    body = await request.json()
    rsp = await task_mgr.ask(body["message"])
    return JSONResponse({"reply": rsp.reply, "tools": [c.name for c in rsp.tool_calls]})


app = Starlette(routes=[Route("/overdue/{user}", overdue), Route("/ask", ask, methods=["POST"])], lifespan=lifespan)
