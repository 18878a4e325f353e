"""micro inside an aiohttp app: the services, agent and flow start and stop with ``cleanup_ctx``.

Run it with ``python aiohttp_app.py`` from this directory (port 8080); then
``GET /overdue/alice`` calls the task service and ``POST /ask`` asks the agent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

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


task = micro.New("task")
task.handle(Task())
task_mgr = micro.NewAgent("task-mgr", services=["task"], prompt="You manage tasks.", provider="scripted")
onboard = micro.NewFlow("onboard", trigger="events.user.created", services=["task"], provider="scripted",
                        prompt="New user: {data}.")


async def micro_services(app: web.Application) -> AsyncIterator[None]:
    async with task, task_mgr, onboard:  # up before the first request; stopped on shutdown
        yield


async def overdue(request: web.Request) -> web.Response:
    rsp = await task.client.call("task", "Task.ListOverdue", {"user_id": request.match_info["user"]})
    return web.json_response(rsp)


async def ask(request: web.Request) -> web.Response:
    body = await request.json()
    rsp = await task_mgr.ask(body["message"])
    return web.json_response({"reply": rsp.reply, "tools": [c.name for c in rsp.tool_calls]})


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(micro_services)
    app.router.add_get("/overdue/{user}", overdue)
    app.router.add_post("/ask", ask)
    return app


if __name__ == "__main__":
    web.run_app(make_app())
