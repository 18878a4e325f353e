"""An agent whose one tool waits until it is cancelled: Ctrl-C during a chat turn (tests/test_chat.py).

`micro run tests/apps/waiter.py`; `micro chat` then shows the tool call start and nothing more
until the turn is cancelled.
"""

from typing import Any

import anyio

import micro
from micro.ai import Message, ToolSpec, scripted


class Wait:
    async def Forever(self, req: dict[str, Any]) -> dict[str, Any]:
        """Wait until the call is cancelled."""
        await anyio.sleep_forever()
        return {}


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    if len(messages) == 1:
        return scripted.turn("Waiting...", scripted.call("wait_Wait_Forever", {}))
    return "done waiting"


wait = micro.New("wait")
wait.handle(Wait())
waiter = micro.NewAgent("waiter", services=["wait"], provider=scripted.function(brain))
