"""A stepped-flow process for the JetStream tests: `python stepped_worker.py` (env: MICRO_BROKER, MICRO_HOME).

Flow `orders` on `orders.placed` (event {"n": N}): debit (Ledger.Debit), a check, credit (Ledger.Credit),
a last function. Flow `approvals` on `approvals.requested` waits at `confirm` (an Await), then credits.
Prints "ready" once subscribed.
"""

import asyncio
from typing import Any

import anyio
import msgspec

import micro
from micro.flow import Await, Call, State
from micro.service.service import stop_on_signals


class Confirm(msgspec.Struct):
    ok: bool


def checked(state: State) -> dict[str, Any]:
    return {"n": state.event["n"], "debited": state["debit"]["applied"]}


async def main() -> None:
    orders = micro.NewFlow("orders", trigger="orders.placed", max_concurrency=4, steps=[
        Call("ledger", "Ledger.Debit", name="debit", request={"n": "{n}"}),
        checked,
        Call("ledger", "Ledger.Credit", name="credit", request={"n": "{n}"}),
        lambda s: {"done": s.event["n"]},
    ])
    approvals = micro.NewFlow("approvals", trigger="approvals.requested", steps=[
        Await("confirm", schema=Confirm),
        Call("ledger", "Ledger.Credit", name="credit", request={"n": "{n}"}),
    ])
    async with orders, approvals, anyio.create_task_group() as tg:
        await tg.start(stop_on_signals, tg.cancel_scope)
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    asyncio.run(main())
