"""Go Micro's names for the everyday constructors, folded into keyword arguments.

``micro.New("task")`` is ``micro.Service("task")``. Option helpers read the way
they do in Go and return keyword arguments::

    micro.New("task", micro.Version("1.2.0"), micro.Address("127.0.0.1:9090"))

is ``micro.Service("task", version="1.2.0", address="127.0.0.1:9090")``.

The classes are the canonical spelling; these are aliases whose keyword arguments are
typed from them (:class:`NewServiceOptions` and siblings, checked against the
constructors by a test), so ``micro.New("task", adress="…")`` is a mypy error too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from micro.agent import Agent, Memory
from micro.agent.loop import Approve
from micro.ai import Model
from micro.flow import Flow
from micro.flow.flow import FlowStep, Step
from micro.service import AgentServiceOptions, Service, ServiceOptions


class Option(dict[str, Any]):
    """One keyword argument, written the Go way."""


class NewServiceOptions(AgentServiceOptions, total=False):
    """The keyword arguments of :class:`~micro.Service` (after the name)."""

    metadata: Mapping[str, str] | None


class NewAgentOptions(AgentServiceOptions, total=False):
    """The keyword arguments of :class:`~micro.Agent` (after the name)."""

    services: Sequence[str]
    prompt: str
    provider: str | Model | None
    model: str | None
    api_key: str | None
    base_url: str | None
    max_steps: int
    loop_limit: int
    tool_timeout: float | None
    model_timeout: float | None
    max_tokens: int | None
    approve: Approve | None
    history_limit: int
    agents: Sequence[str]
    max_delegation_depth: int
    forward: Sequence[str]
    needs_approval: Sequence[str]
    builtins: Sequence[str] | None
    pause_ttl: float
    resume_interrupted: bool
    memory: Memory | None
    remote_headers: Mapping[str, Mapping[str, str]] | None
    metadata: Mapping[str, str] | None


class NewFlowOptions(ServiceOptions, total=False):
    """The keyword arguments of :class:`~micro.Flow` (after the name)."""

    trigger: str
    prompt: str
    services: Sequence[str]
    provider: str | Model | None
    model: str | None
    agent: str | None
    steps: Sequence[FlowStep]
    after: Sequence[Step]
    max_concurrency: int
    system: str | None
    max_steps: int
    loop_limit: int
    tool_timeout: float | None
    model_timeout: float | None
    approve: Approve | None
    needs_approval: Sequence[str]
    builtins: Sequence[str]
    pause_ttl: float
    schedule: str | None
    every: str | float | None
    catch_up: str
    metadata: Mapping[str, str] | None


def New(name: str, *options: Option, **kwargs: Unpack[NewServiceOptions]) -> Service:
    """A new :class:`~micro.Service` (Go Micro's ``micro.New``)."""
    return Service(name, **_fold(options, kwargs))


NewService = New


def Version(version: str) -> Option:
    """``version=``"""
    return Option(version=version)


def Address(address: str) -> Option:
    """``address=``"""
    return Option(address=address)


def Metadata(metadata: Mapping[str, str]) -> Option:
    """``metadata=``"""
    return Option(metadata=dict(metadata))


def RegisterTTL(ttl: float) -> Option:
    """``ttl=``"""
    return Option(ttl=ttl)


def NewAgent(name: str, *options: Option, **kwargs: Unpack[NewAgentOptions]) -> Agent:
    """A new :class:`~micro.Agent` (Go Micro's ``micro.NewAgent``)."""
    return Agent(name, **_fold(options, kwargs))


def AgentServices(*services: str) -> Option:
    """``services=[...]``: the services whose endpoints the agent uses as tools."""
    return Option(services=list(services))


def AgentPrompt(prompt: str) -> Option:
    """``prompt=``: the agent's system prompt."""
    return Option(prompt=prompt)


def AgentProvider(provider: str) -> Option:
    """``provider=``: ``"anthropic"``, ``"openai"``, ``"scripted"`` or ``"name:model"``."""
    return Option(provider=provider)


def AgentModel(model: str) -> Option:
    """``model=``: the model id for the provider."""
    return Option(model=model)


def NewFlow(name: str, *options: Option, **kwargs: Unpack[NewFlowOptions]) -> Flow:
    """A new :class:`~micro.Flow` (Go Micro's ``micro.NewFlow``)."""
    return Flow(name, **_fold(options, kwargs))


def FlowTrigger(topic: str) -> Option:
    """``trigger=``: the topic whose messages start a run."""
    return Option(trigger=topic)


def FlowPrompt(prompt: str) -> Option:
    """``prompt=``: the template rendered from each event."""
    return Option(prompt=prompt)


def FlowServices(*services: str) -> Option:
    """``services=[...]``: the services the flow's model step may use."""
    return Option(services=list(services))


def _fold(options: tuple[Option, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt in options:
        if not isinstance(opt, Option):
            raise TypeError(f"expected an option such as micro.Version(...), got {opt!r}")
        out.update(opt)
    out.update(kwargs)
    return out
