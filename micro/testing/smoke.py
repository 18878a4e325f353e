"""Smoke-test an app the way ``micro run`` would run it, on memory backends.

:func:`check_app` imports the app (a file, or a directory with ``app.py``),
checks that every service's handlers introspect to endpoints with JSON schemas
and descriptions, starts everything in a :func:`micro.testing.runtime`, calls
every endpoint once with a minimal request built from its schema, and asks every
agent one message on a scripted model that calls one of its tools (flows are
only started: their runs need events). It returns
the problems found (empty when the app is healthy)::

    problems = await check_app(Path("myapp"))
    assert not problems, "\\n".join(map(str, problems))

An endpoint may refuse the made-up request with a micro error (``BadRequest``,
``NotFound``, …): that is a handler doing its job. An unexpected exception
(``Internal``), a wrong response type or a timeout is a problem.

``python -m micro.testing.smoke PATH [--require-agent] [--report FILE]`` runs it
as a program (``micro run --prompt`` validates generated code this way, in a
process of its own): exit code 0 when healthy, 1 with the problems otherwise.
It imports the app (with ``MICRO_PROVIDER=scripted`` for the import, so agents
need no key), so run it only on code you are willing to execute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from micro.agent import Agent
from micro.agent.agent import DEFAULT_PROVIDER_ENV as PROVIDER_ENV
from micro.ai import Message, ToolResultBlock, ToolSpec, scripted
from micro.errors import Error, Internal, Timeout
from micro.service import Service
from micro.testing.runtime import runtime

__all__ = ["Problem", "check_app", "example_request", "main"]


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with an app: the stage it showed in, where, and what."""

    stage: str  # import | introspect | start | call | agent
    where: str
    message: str

    def __str__(self) -> str:
        return f"[{self.stage}] {self.where}: {self.message}"


async def check_app(path: Path, *, require_agent: bool = False, timeout: float = 10.0) -> list[Problem]:
    """The problems of the app at ``path`` (see the module docstring); empty when it is healthy.

    Args:
        path: a Python file, or a directory with ``app.py`` / ``main.py`` / ``__main__.py``.
        require_agent: also require at least one agent that manages a service of the app.
        timeout: seconds each endpoint call and each agent run may take.
    """
    from micro.cli.run import load_app, runnables

    root = (path if path.is_dir() else path.parent).resolve()  # noqa: ASYNC240 - before anything runs
    saved = os.environ.get(PROVIDER_ENV)
    os.environ[PROVIDER_ENV] = "scripted"  # agents built at import need no key: the smoke run replaces the model
    try:
        module = load_app(path)
    except SystemExit:
        return [Problem("import", str(path), "the app exited while being imported (sys.exit or SystemExit)")]
    except Exception as exc:
        return [Problem("import", str(path), _trace(exc, root))]
    finally:
        if saved is None:
            del os.environ[PROVIDER_ENV]
        else:
            os.environ[PROVIDER_ENV] = saved
    items = runnables(module)
    problems = _introspect(items, require_agent)
    if problems:
        return problems
    async with runtime() as rt, contextlib.AsyncExitStack() as stack:
        for item in items:
            try:
                await stack.enter_async_context(item)
            except Exception as exc:
                return [Problem("start", item.name, _trace(exc, root))]
        for item in items:
            if isinstance(item, Agent):
                problems += await _ask(item, timeout, root)
                continue
            if _is_flow(item):
                continue  # started is enough: its runs need events, and its endpoints only list them
            for ep in item.endpoints.values():
                request = example_request(ep.record().request)
                with _captured() as logged:
                    try:
                        if ep.streaming:
                            async with asyncio.timeout(timeout):
                                async for _ in rt.client.stream(item.name, ep.name, request, timeout=timeout):
                                    break
                        else:
                            await rt.client.call(item.name, ep.name, request, timeout=timeout)
                    except Internal as exc:
                        cause = _trace(logged[-1], root) if logged else str(exc)
                        problems.append(Problem("call", f"{item.name} {ep.name}", (
                            f"failed on the request {_json(request)}: {cause}. A handler must answer any request "
                            "of its type: raise micro.errors.BadRequest or NotFound for input it refuses")))
                    except (Timeout, TimeoutError):
                        problems.append(Problem("call", f"{item.name} {ep.name}",
                                                f"did not answer within {timeout}s (request {_json(request)})"))
                    except Error:
                        pass  # refused the made-up request with a proper error: fine
    return problems


def _is_flow(item: Service) -> bool:
    return item.metadata.get("type") == "flow"


def _introspect(items: list[Service], require_agent: bool) -> list[Problem]:
    problems: list[Problem] = []
    services = [i for i in items if not isinstance(i, Agent) and not _is_flow(i)]
    agents = [i for i in items if isinstance(i, Agent)]
    if not services:
        problems.append(Problem("introspect", "app", "defines no services at top level (micro.New(...))"))
    for svc in services:
        if not svc.endpoints:
            problems.append(Problem("introspect", svc.name, "has no endpoints: call service.handle(Handler())"))
            continue
        try:
            record = svc.record
        except Exception as exc:
            problems.append(Problem("introspect", svc.name, f"cannot describe its endpoints: {exc}"))
            continue
        for ep in record.endpoints:
            if not ep.request or not ep.response:
                problems.append(Problem("introspect", f"{svc.name} {ep.name}", "has no request/response schema"))
            if not ep.description.strip():
                problems.append(Problem("introspect", f"{svc.name} {ep.name}",
                                        "has no docstring: it is the tool description agents see"))
    names = {s.name for s in services}
    for agent in agents:
        missing = [s for s in agent.services if s not in names]
        if missing:
            problems.append(Problem("introspect", agent.name,
                                    f"manages {missing}, which the app does not define (it defines {sorted(names)})"))
        if not agent.services:
            problems.append(Problem("introspect", agent.name, "manages no services: pass services=[...]"))
    if require_agent and not agents:
        problems.append(Problem("introspect", "app", "defines no agent at top level (micro.NewAgent(...))"))
    return problems


async def _ask(agent: Agent, timeout: float, root: Path) -> list[Problem]:
    def brain(messages: list[Message], tools: list[ToolSpec]) -> scripted.Turn | str:
        if any(isinstance(b, ToolResultBlock) for b in messages[-1].content) or not tools:
            return "smoke test done"
        first = min(tools, key=lambda t: t.name)
        return scripted.call(first.name, example_request(first.input_schema))

    model = scripted.function(brain)
    previous, agent.model = agent.model, model
    try:
        await agent.ask("smoke test: use one of your tools", timeout=timeout)
    except Exception as exc:
        return [Problem("agent", agent.name, _trace(exc, root))]
    finally:
        agent.model = previous
    if not model.calls or not model.calls[0].tools:
        return [Problem("agent", agent.name, f"has no tools: none of its services {agent.services} is running")]
    return []


def example_request(schema: dict[str, Any]) -> Any:
    """A minimal value of a JSON Schema: the required fields only, each with a plain value."""
    return _example(schema, schema.get("$defs", {}), 0)


def _example(schema: dict[str, Any], defs: dict[str, Any], depth: int) -> Any:
    if depth > 8:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _example(defs.get(ref.rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(key, []) if o.get("type") != "null"]
        if options:
            return _example(options[0], defs, depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "string":
        fmt = schema.get("format")
        special = {"date": "2026-01-01", "date-time": "2026-01-01T00:00:00Z", "time": "00:00:00",
                   "uuid": "00000000-0000-4000-8000-000000000000", "email": "smoke@example.com"}
        if fmt in special:
            return special[fmt]
        text = "smoke"
        if "maxLength" in schema:
            text = text[: schema["maxLength"]]
        return text.ljust(schema.get("minLength", 0), "s")
    if kind in ("integer", "number"):
        value = max(1, schema.get("minimum", 1), schema.get("exclusiveMinimum", 0) + 1)
        value = min(value, schema.get("maximum", value))
        return value if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    if kind == "array":
        return [_example(schema.get("items", {}), defs, depth + 1) for _ in range(schema.get("minItems", 0))]
    if kind == "null":
        return None
    props = schema.get("properties", {})
    return {k: _example(props.get(k, {}), defs, depth + 1) for k in schema.get("required", [])}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _captured() -> Iterator[list[BaseException]]:
    """The exceptions a handler raised, as the service logs them (they never cross the call)."""
    handler = _Capture()
    logger = logging.getLogger("micro.service")
    logger.addHandler(handler)
    try:
        yield handler.errors
    finally:
        logger.removeHandler(handler)


def _trace(exc: BaseException, root: Path) -> str:
    """The exception and the frames of it that are in the app's own files."""
    from micro.cli.run import app_frames

    frames = [f"{Path(f.filename).resolve().relative_to(root)}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
              for f in app_frames(exc, root)]
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return head if not frames else f"{head} (at {' <- '.join(reversed(frames[-3:]))})"


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def main(argv: list[str] | None = None) -> int:
    """``python -m micro.testing.smoke PATH [--require-agent] [--report FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m micro.testing.smoke",
                                     description="Smoke-test an app the way `micro run` would run it.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--require-agent", action="store_true")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--report", type=Path, help="write the problems here as JSON (default: stdout)")
    args = parser.parse_args(argv)
    problems = asyncio.run(check_app(args.path, require_agent=args.require_agent, timeout=args.timeout))
    data = msgspec.json.encode(problems)
    if args.report:
        args.report.write_bytes(data)
    else:
        sys.stdout.write(data.decode() + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
