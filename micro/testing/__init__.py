"""Test helpers for micro apps and backends: memory runtimes, one-line calls, scripted models, kits.

Testing your own services and agents::

    from micro.testing import ask, assert_called, call, scripted

    async def test_overdue():
        rsp = await call(Task(), "Task.ListOverdue", {"user_id": "alice"})
        assert rsp["total"] == 3

    async def test_agent():
        model = scripted.turns(scripted.call("task_Task_ListOverdue", user_id="alice"), "Alice has 3.")
        rsp = await ask(make_agent, "What is overdue for Alice?", model=model, services={"task": Task()})
        assert rsp.reply == "Alice has 3."
        assert_called(model, "task_Task_ListOverdue", user_id="alice")

- :func:`runtime`: an open :class:`micro.Runtime` on memory backends (also the
  ``micro_runtime`` fixture of ``micro.testing.pytest_plugin``);
- :func:`call` / :func:`ask`: call an endpoint of a handler or service, or ask an
  agent, in one line, starting what is not running;
- :mod:`scripted <micro.ai.scripted>` models and tool-call assertions
  (:func:`assert_called`, :func:`assert_not_called`, :func:`assert_offered`, :func:`tool_calls`);
- :mod:`micro.testing.smoke`: smoke-test a whole app the way ``micro run`` runs it;
- conformance kits for backends: :func:`check_store`, :func:`check_broker`, :func:`check_registry`.

The fixtures need ``pytest_plugins = ["micro.testing.pytest_plugin"]`` in your ``conftest.py``.
"""

from micro.ai import scripted
from micro.testing.assertions import ToolUse, assert_called, assert_not_called, assert_offered, tool_calls
from micro.testing.broker_kit import check_broker
from micro.testing.registry_kit import check_registry
from micro.testing.runtime import ask, call, runtime
from micro.testing.store_kit import check_store

__all__ = [
    "ToolUse",
    "ask",
    "assert_called",
    "assert_not_called",
    "assert_offered",
    "call",
    "check_broker",
    "check_registry",
    "check_store",
    "runtime",
    "scripted",
    "tool_calls",
]
