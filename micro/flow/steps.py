"""The steps of a stepped flow: ``Call``, ``LLM``, ``Dispatch``, ``Await``, ``Loop``, ``Verify`` and plain functions.

A stepped flow is a list of steps run in order for every event (or direct run, or
schedule tick)::

    refund = micro.NewFlow("refund", trigger="events.refund.requested", steps=[
        Call("orders", "Orders.Get", name="order", request=lambda s: {"id": s.event["order_id"]}),
        LLM("Does order {order} qualify for a refund? Answer as JSON.", services=["policy"], name="decision"),
        Await("manager", prompt="Approve refund of {order.total} for {order.customer}?", timeout="2d"),
        Call("payments", "Payments.Refund", request={"order": "{order.id}"}),
        Dispatch("comms-mgr", message="Tell {order.customer} their refund is on its way."),
    ])

Each step reads the run's :class:`State` (the event, the outputs of earlier steps by
name, ``data``: the previous step's output) and its output is stored under its name.
Templates (a step's prompt, message, or the strings of a ``request`` dict) reach
them: ``{order.total}`` is the ``total`` field of the output of the step named
``order``; ``{event.order_id}`` (or plainly ``{order_id}``) a field of the event;
``{data}`` the previous step's output; ``{feedback}`` inside a ``Verify`` the
grader's feedback on the previous attempt.

Definitions are checked when the flow is built (:func:`check_steps`): names that
repeat, names a template cannot reach, a template naming a step that has not run
yet, a bad ``timeout``, ``max`` or ``attempts`` are :class:`~micro.errors.UsageError`
naming the step.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec

from micro.errors import BadRequest, UsageError

from .template import TemplateError, render

__all__ = ["LLM", "Await", "Call", "Dispatch", "Fn", "Loop", "State", "Step", "Verify", "check_steps",
           "parse_duration"]

_WHOLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_RESERVED = frozenset({"event", "data", "feedback", "run_id", "iteration"})
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | float | int, what: str) -> float:
    """Seconds from ``"250ms"``, ``"30s"``, ``"15m"``, ``"2h"``, ``"2d"`` or a number of seconds (> 0).

    ``UsageError`` naming ``what`` otherwise.
    """
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a duration such as '30s', '15m', '2h', '2d' or seconds, not {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(value))
        if m is None:
            raise UsageError(f"{what}: {value!r} is not a duration; write e.g. '30s', '15m', '2h', '2d' "
                             "or a number of seconds")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{what}: the duration must be positive and finite, not {value!r}")
    return seconds


class State:
    """What a step reads: the event, the outputs of earlier steps by name, and the previous step's output.

    ``state["order"]`` (or ``state.steps["order"]``) is the output of the step named ``order``
    (inside a ``Loop`` or ``Verify``, the current iteration's outputs shadow the ones outside);
    ``state.event`` the event (or the direct run's data, or ``{"tick": …}`` for a schedule);
    ``state.data`` the previous step's output (the event for the first step); ``state.feedback``
    the grader's feedback on the previous attempt of the enclosing ``Verify`` (``None`` on the
    first); ``state.iteration`` the index of the enclosing ``Loop``/``Verify`` iteration.
    """

    __slots__ = ("data", "event", "feedback", "iteration", "run_id", "steps", "verifying")

    def __init__(self, run_id: str, event: Any, steps: Mapping[str, Any], data: Any,
                 feedback: str | None = None, iteration: int = 0, verifying: bool = False) -> None:
        self.run_id = run_id
        self.event = event
        self.steps = dict(steps)
        self.data = data
        self.feedback = feedback
        self.iteration = iteration
        self.verifying = verifying

    def __getitem__(self, name: str) -> Any:
        try:
            return self.steps[name]
        except KeyError:
            raise KeyError(f"no step output {name!r} yet (there are: {', '.join(self.steps) or 'none'})") from None

    def __contains__(self, name: object) -> bool:
        return name in self.steps

    def fields(self) -> dict[str, Any]:
        """What a template can name: the event's fields, the step outputs (which win), and the reserved names."""
        out: dict[str, Any] = dict(self.event) if isinstance(self.event, Mapping) else {}
        out.update(self.steps)
        out.update(event=self.event, data=self.data, run_id=self.run_id, iteration=self.iteration)
        if self.feedback is not None or self.verifying:
            out["feedback"] = self.feedback or ""
        return out

    def lookup(self, field: str, where: str) -> Any:
        """The value a template field names (``order.total``), or ``TemplateError``."""
        value: Any = self.fields()
        for part in field.split("."):
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return self.render("{" + field + "}", where)  # raises, naming what there is
        return value

    def render(self, template: str, where: str) -> str:
        """``template`` filled from this state; ``TemplateError`` naming ``where`` and what there is."""
        try:
            return render(template, self.fields())
        except TemplateError as exc:
            raise TemplateError(
                f"{where}: {str(exc).replace('the event has no field', 'no step output or event field')} "
                f"(step outputs so far: {', '.join(self.steps) or 'none'}; event fields: "
                f"{', '.join(self.event) if isinstance(self.event, Mapping) else 'none (it is not an object)'})"
            ) from None

    def render_value(self, value: Any, where: str) -> Any:
        """Strings in ``value`` (a dict / list / str) filled from this state, recursively; a string that is
        one field and nothing else (``"{order.total}"``) is that field's value, not its text."""
        if isinstance(value, str):
            whole = _WHOLE.fullmatch(value)
            if whole is not None:
                return self.lookup(whole.group(1), where)
            return self.render(value, where)
        if isinstance(value, Mapping):
            return {k: self.render_value(v, where) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.render_value(v, where) for v in value]
        return value


StepFn = Callable[[State], Awaitable[Any] | Any]
"""A plain function step: ``def step(state) -> output`` (sync or async)."""
Check = Callable[[State], Awaitable[Any] | Any]


class Step:
    """Base of the step kinds. ``name`` is where the output is stored; ``retry`` how many times a transient
    failure (``Unavailable``, ``Timeout``…) is retried in place, with backoff, before the run is handed
    back to the broker's redelivery."""

    kind = "step"

    def __init__(self, name: str, retry: int = 0) -> None:
        self.name = name
        if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
            raise UsageError(f"step {name}: retry must be a whole number of retries (0 or more), not {retry!r}")
        self.retry = retry

    def templates(self) -> list[tuple[str, str]]:
        """``(what, template)`` pairs this step renders (checked at definition time)."""
        return []

    def bodies(self) -> list[tuple[str, Sequence[Step]]]:
        """Nested step lists (Loop / Verify bodies, an Await's on_timeout)."""
        return []

    def needs_model(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Fn(Step):
    """A plain function step ``(state) -> output`` (``steps=[my_function]`` wraps it in this; a lambda is named
    ``step{N}`` by its place). ``Fn(fn, name=…)`` names it, and makes a flow of only functions a stepped one."""

    kind = "function"

    def __init__(self, fn: StepFn, name: str | None = None, retry: int = 0) -> None:
        super().__init__(name or _fn_name(fn), retry)
        self.fn = fn


class Call(Step):
    """Call ``service``'s ``endpoint``; the output is the response.

    ``request``: a callable ``(state) -> request``, a template (a dict or list whose strings are
    rendered, or a string rendered then read as JSON), or None: the run's current data (the
    previous step's output, or the event for the first step). The call carries the idempotency key
    ``{run id}:{step path}`` (the path names the Loop/Verify iteration), so a retried or redelivered
    step makes its side effect once at a service that honours keys. Default name: the service's.
    """

    kind = "call"

    def __init__(self, service: str, endpoint: str, *, request: Any = None, name: str | None = None,
                 retry: int = 0, timeout: float | None = None) -> None:
        super().__init__(name or service.replace(".", "_"), retry)
        if not service or not endpoint or "." not in endpoint:
            raise UsageError(f"step {self.name}: Call needs a service and an endpoint such as 'Orders.Get', "
                             f"not {service!r}, {endpoint!r}")
        self.service = service
        self.endpoint = endpoint
        self.request = request
        self.timeout = timeout

    def templates(self) -> list[tuple[str, str]]:
        return _strings(self.request) if not callable(self.request) else []


class LLM(Step):
    """One agent-style model loop over ``services``' endpoints; the output is its reply.

    With ``output=Type`` (a msgspec Struct, or any type msgspec converts to) the reply is read as
    JSON and validated against it; the stored output is that JSON. The model is the flow's
    (``provider=`` / ``model=``). Default name: ``llm``.
    """

    kind = "llm"

    def __init__(self, prompt: str, *, services: Sequence[str] = (), output: Any = None, name: str = "llm",
                 system: str | None = None, retry: int = 0) -> None:
        super().__init__(name, retry)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"step {name}: LLM needs a prompt")
        if isinstance(services, str):
            raise UsageError(f"step {name}: services must be a list of service names, e.g. [{services!r}]")
        self.prompt = prompt
        self.services = list(services)
        self.output = output
        self.system = system

    def templates(self) -> list[tuple[str, str]]:
        return [("prompt", self.prompt)]

    def needs_model(self) -> bool:
        return True


class Dispatch(Step):
    """Hand ``message`` (a template) to ``agent``'s ``Agent.Chat``; the output is its reply. The agent's
    run is linked to this flow run as a child (``parent_id``). Default name: the agent's."""

    kind = "dispatch"

    def __init__(self, agent: str, *, message: str, name: str | None = None, retry: int = 0) -> None:
        super().__init__(name or agent, retry)
        if not agent or not isinstance(message, str) or not message.strip():
            raise UsageError(f"step {self.name}: Dispatch needs an agent name and a message")
        self.agent = agent
        self.message = message

    def templates(self) -> list[tuple[str, str]]:
        return [("message", self.message)]


class Await(Step):
    """Suspend the run until input arrives; the output is that input.

    The run is recorded as ``waiting`` (what for, since when, until when) and its event is
    acknowledged. ``flow.resume(run_id, input)`` (``Flow.Resume``, ``micro flow resume``)
    continues it; with ``topic=`` and ``match=`` an event on ``topic`` whose ``match`` field
    equals the run event's field of that name continues it too (the event is the input).

    ``schema``: a type the input must convert to (msgspec); bad input is a ``BadRequest`` and
    the run stays waiting. ``timeout``: a duration (``"2d"``); when it passes, the run takes the
    ``on_timeout`` steps (their last output is the Await's) or, without them, fails.
    """

    kind = "await"

    def __init__(self, name: str, *, prompt: str = "", timeout: str | float | None = None, schema: Any = None,
                 topic: str | None = None, match: str | None = None, on_timeout: Sequence[Any] = ()) -> None:
        super().__init__(name)
        self.prompt = prompt
        self.timeout = None if timeout is None else parse_duration(timeout, f"step {name}: timeout")
        self.schema = schema
        if (topic is None) != (match is None):
            raise UsageError(f"step {name}: give an Await both topic= and match= (the event field that "
                             "pairs an event with its run), or neither")
        self.topic = topic
        self.match = match
        self.on_timeout = as_steps(on_timeout)
        if self.on_timeout and self.timeout is None:
            raise UsageError(f"step {name}: on_timeout steps need a timeout=")

    def templates(self) -> list[tuple[str, str]]:
        return [("prompt", self.prompt)] if self.prompt else []

    def bodies(self) -> list[tuple[str, Sequence[Step]]]:
        return [("on_timeout", self.on_timeout)] if self.on_timeout else []

    def input_schema(self) -> dict[str, Any]:
        """The JSON Schema of the input (``{}`` without ``schema=``), recorded with a waiting run."""
        if self.schema is None:
            return {}
        from micro.codec import codec_for

        try:
            return codec_for(self.schema).schema()
        except (UsageError, TypeError, ValueError):  # a type msgspec converts to but cannot describe
            return {}

    def validate(self, flow: str, run_id: str, value: Any) -> Any:
        """The input as the run stores it, or ``BadRequest`` naming the run, the step and the field."""
        if self.schema is not None:
            try:
                value = msgspec.convert(value, self.schema)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"flow {flow}: run {run_id} waits at {self.name}: the input does not fit its "
                                 f"schema {getattr(self.schema, '__name__', self.schema)}: {exc}; the run still "
                                 "waits") from None
        try:
            return msgspec.to_builtins(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise BadRequest(f"flow {flow}: run {run_id} waits at {self.name}: the input is not JSON data "
                             f"({exc})") from None


class Loop(Step):
    """Run ``body`` again and again until ``until`` says stop, at most ``max`` times; the output is the last
    iteration's last output.

    ``until``: a callable ``(state) -> bool`` (``state.data`` is the iteration's output), or a
    yes/no question for the model (a template). Without ``until`` the body runs exactly ``max``
    times; with it, ``max`` iterations without a yes fail the run naming the loop.
    """

    kind = "loop"

    def __init__(self, body: Sequence[Any], *, until: Check | str | None = None, max: int = 10,
                 name: str = "loop") -> None:
        super().__init__(name)
        self.body = as_steps(body)
        if not self.body:
            raise UsageError(f"step {name}: a Loop needs body steps")
        if isinstance(max, bool) or not isinstance(max, int) or max < 1:
            raise UsageError(f"step {name}: max must be a whole number of iterations (1 or more), not {max!r}")
        self.until = until
        self.max = max

    def templates(self) -> list[tuple[str, str]]:
        return [("until", self.until)] if isinstance(self.until, str) else []

    def bodies(self) -> list[tuple[str, Sequence[Step]]]:
        return [("body", self.body)]

    def needs_model(self) -> bool:
        return isinstance(self.until, str)


class Verify(Step):
    """Run ``body``, then ``check`` its output; if it fails, run the body again with the feedback, up to
    ``attempts`` times; the output is the accepted attempt's last output.

    ``check``: a callable ``(state) -> bool | (bool, feedback)``, or grading instructions for the
    model (it answers ``{"ok": …, "feedback": …}``). The feedback reaches the next attempt as
    ``state.feedback`` and ``{feedback}``. When every attempt fails, the run fails naming the step
    and the last feedback.
    """

    kind = "verify"

    def __init__(self, body: Sequence[Any], *, check: Check | str, attempts: int = 2, name: str = "verify") -> None:
        super().__init__(name)
        self.body = as_steps(body)
        if not self.body:
            raise UsageError(f"step {name}: a Verify needs body steps")
        if not callable(check) and not (isinstance(check, str) and check.strip()):
            raise UsageError(f"step {name}: check must be a function (state) -> bool | (bool, feedback) "
                             "or grading instructions for the model")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise UsageError(f"step {name}: attempts must be a whole number (1 or more), not {attempts!r}")
        self.check = check
        self.attempts = attempts

    def templates(self) -> list[tuple[str, str]]:
        return [("check", self.check)] if isinstance(self.check, str) else []

    def bodies(self) -> list[tuple[str, Sequence[Step]]]:
        return [("body", self.body)]

    def needs_model(self) -> bool:
        return isinstance(self.check, str)


def _fn_name(fn: Any) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def _strings(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [("request", value)]
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def as_steps(steps: Sequence[Any]) -> list[Step]:
    """Steps from a list of steps and plain functions (``UsageError`` for anything else)."""
    if isinstance(steps, Step) or callable(steps):
        steps = [steps]
    out: list[Step] = []
    for i, s in enumerate(steps):
        if isinstance(s, Step):
            out.append(s)
        elif callable(s):
            name = _fn_name(s)
            out.append(Fn(s, name=name if _NAME.match(name) else f"step{i + 1}"))  # a lambda: by its place
        else:
            raise UsageError(f"a step must be Call, LLM, Dispatch, Await, Loop, Verify or a function, not {s!r}")
    return out


def is_stepped(steps: Sequence[Any]) -> bool:
    """Whether ``steps`` uses the step kinds (a stepped flow), not only ``(event, run)`` functions."""
    return any(isinstance(s, Step) for s in steps)


def _fields(template: str, where: str) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"{where}: the template is malformed: {exc}") from None
    return [field.split(".")[0].split("[")[0] for _, field, _, _ in parsed if field]


def check_steps(flow: str, steps: Sequence[Step]) -> None:
    """Definition-time checks of a flow's steps (``UsageError`` naming the flow and the step)."""
    _check(flow, list(steps), [], _all_names(steps))


def _all_names(steps: Sequence[Step]) -> set[str]:
    out: set[str] = set()
    for s in steps:
        out.add(s.name)
        for _, body in s.bodies():
            out |= _all_names(body)
    return out


def _check(flow: str, steps: list[Step], outer: list[str], every: set[str]) -> None:
    seen = list(outer)
    for s in steps:
        where = f"flow {flow}: step {s.name}"
        if not _NAME.match(s.name):
            raise UsageError(f"{where}: a step name is letters, digits, '_' and '-', starting with a letter "
                             "(templates reach outputs as {name.field}); pass name=")
        if s.name in _RESERVED:
            raise UsageError(f"{where}: {s.name!r} is reserved in templates ({', '.join(sorted(_RESERVED))}); "
                             "pass another name=")
        if s.name in seen:
            raise UsageError(f"flow {flow}: two steps are named {s.name!r}; step outputs are stored by name, so "
                             "give each a name= of its own")
        for what, template in s.templates():
            for field in _fields(template, f"{where}: {what}"):
                if field in every and field not in seen:
                    later = "itself" if field == s.name else f"step {field!r}, which has not run by then"
                    raise UsageError(f"{where}: the {what} template names {{{field}}}: the output of {later}; a "
                                     "template can reach the event and the steps before it")
        for _, body in s.bodies():
            _check(flow, list(body), seen, every)
        seen.append(s.name)
