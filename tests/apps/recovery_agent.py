"""An agent for the crash-recovery test: `python recovery_agent.py`; prints "ready".

Its scripted model counts "a" and "b" in one turn, then "c" (slowly) and "d" in the
next, then answers with what it saw; asked to "reset", it resets "a", which needs a
person's approval.
"""

import asyncio

import micro
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted


def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    turns = sum(1 for m in messages if m.role == "assistant")
    request = next(m.text for m in reversed(messages) if m.role == "user" and m.text)
    if request == "reset":
        if not results:
            return scripted.call("counter_Counter_Reset", item="a")
        return f"reset: {results[0].content}"
    if not results:
        return scripted.turn(scripted.call("counter_Counter_Add", item="a"),
                             scripted.call("counter_Counter_Add", item="b"))
    if turns == 1:
        return scripted.turn(scripted.call("counter_Counter_Slow", item="c"),
                             scripted.call("counter_Counter_Add", item="d"))
    return "counted: " + ", ".join(r.content for r in results)


async def main() -> None:
    agent = micro.NewAgent("keeper", services=["counter"], provider=scripted.function(brain),
                           needs_approval=["counter_Counter_Reset"])
    async with agent:
        print("ready", flush=True)
        await agent.wait()


if __name__ == "__main__":
    asyncio.run(main())
