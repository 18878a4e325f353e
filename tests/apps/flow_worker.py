"""A flow process for the durability test: `python flow_worker.py` (env: MICRO_BROKER, MICRO_HOME).

Flow `jobs` on `jobs.created` calls counter_Counter_Add(job=N) for the event {"n": N}
through a scripted model, then answers. Prints "ready" once subscribed.
"""

import asyncio

import anyio
import msgspec

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.service.service import stop_on_signals


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return "failed" if results[0].is_error else "done"
    event = msgspec.json.decode(messages[0].text.split("Event: ", 1)[1])
    return scripted.call("counter_Counter_Add", job=event["n"])


async def main() -> None:
    flow = micro.NewFlow("jobs", trigger="jobs.created", prompt="Event: {data}", services=["counter"],
                         provider=scripted.function(brain), max_concurrency=4)
    async with flow, anyio.create_task_group() as tg:
        await tg.start(stop_on_signals, tg.cancel_scope)
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    asyncio.run(main())
