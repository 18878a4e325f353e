"""The chat router: which agents should answer a message.

``micro chat`` finds the agents in the registry (records with ``type=agent``).
With one agent there is nothing to decide. With several, one model call with a
single ``route`` tool classifies the message to one or more agents, each with
the part of the message meant for it; the chosen agents are then asked
concurrently. Without a model key, :class:`KeywordRouter` stands in: a labelled
router that matches the message's words against each agent's name and services.
"""

from __future__ import annotations

import re

import msgspec

from micro.ai import Message, Model, ToolSpec, ToolUseBlock
from micro.registry import Registry, ServiceRecord


class AgentInfo(msgspec.Struct, frozen=True):
    """An agent as the registry describes it."""

    name: str
    services: list[str]
    prompt: str = ""
    provider: str = ""
    model: str = ""
    address: str = ""

    @classmethod
    def from_record(cls, rec: ServiceRecord) -> AgentInfo:
        meta = rec.metadata
        services = [s for s in meta.get("services", "").split(",") if s]
        address = rec.nodes[0].address if rec.nodes else ""
        return cls(rec.name, services, meta.get("prompt", ""), meta.get("provider", ""), meta.get("model", ""),
                   address)


class Route(msgspec.Struct, frozen=True):
    """One agent to ask, and what to ask it; ``guessed`` when nothing in the message chose it."""

    agent: str
    message: str
    guessed: bool = False


async def discover(registry: Registry) -> list[AgentInfo]:
    """Every agent in the registry, sorted by name."""
    return [AgentInfo.from_record(r) for r in await registry.list() if r.metadata.get("type") == "agent"]


ROUTER_SYSTEM = """You route a user's message to the agents that should handle it.
Agents:
{agents}
Call the route tool once. Choose every agent whose domain the message touches (often just one);
give each the part of the message meant for it, in the user's words."""


def route_tool(agents: list[AgentInfo]) -> ToolSpec:
    names = [a.name for a in agents]
    return ToolSpec(
        "route",
        "Send the message (or the part of it for each) to one or more agents.",
        {
            "type": "object",
            "properties": {
                "routes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "agent": {"type": "string", "enum": names},
                            "message": {"type": "string"},
                        },
                        "required": ["agent", "message"],
                    },
                }
            },
            "required": ["routes"],
        },
    )


class Router:
    """Classifies messages to agents with one model call."""

    def __init__(self, model: Model) -> None:
        self.model = model

    async def route(self, message: str, agents: list[AgentInfo]) -> list[Route]:
        """The agents to ask; with one agent, that agent. Unknown names the model makes up are dropped."""
        if not agents:
            return []
        if len(agents) == 1:
            return [Route(agents[0].name, message)]
        listing = "\n".join(f"- {a.name}: manages {', '.join(a.services) or 'nothing'}. {a.prompt}" for a in agents)
        rsp = await self.model.generate(
            [Message.user(message)], tools=[route_tool(agents)], system=ROUTER_SYSTEM.format(agents=listing),
        )
        known = {a.name for a in agents}
        routes: list[Route] = []
        for use in rsp.tool_uses:
            for item in _routes(use):
                if item.agent in known and all(r.agent != item.agent for r in routes):
                    routes.append(item)
        return routes


def _routes(use: ToolUseBlock) -> list[Route]:
    raw = use.input.get("routes")
    if not isinstance(raw, list):
        return []
    out = []
    for item in raw:
        if isinstance(item, dict) and isinstance(item.get("agent"), str):
            out.append(Route(item["agent"], str(item.get("message") or "")))
    return out


KEYWORD_LABEL = "keyword router (scripted; set ANTHROPIC_API_KEY for a model router)"


class KeywordRouter:
    """A labelled stand-in for :class:`Router` when no model is configured.

    An agent is chosen when a word of the message shares its first five letters
    with the agent's name or one of its services ("notify" reaches an agent that
    manages ``notification``). With no match it guesses, and says so
    (``Route.guessed``): the agent that manages the most services answers.
    """

    label = KEYWORD_LABEL

    async def route(self, message: str, agents: list[AgentInfo]) -> list[Route]:
        if len(agents) <= 1:
            return [Route(a.name, message) for a in agents]
        chosen: list[AgentInfo] = []
        for word in re.findall(r"[a-z]+", message.lower()):
            matches = [a for a in agents if any(_same(word, t) for t in _terms(a))]
            if matches:
                # the most specific agent: its name says it, then the fewest services
                best = min(matches, key=lambda a: (not any(_same(word, t) for t in _terms(a, services=False)),
                                                   len(a.services), a.name))
                if best not in chosen:
                    chosen.append(best)
        if not chosen:
            broadest = min(agents, key=lambda a: (-len(a.services), a.name))
            return [Route(broadest.name, message, guessed=True)]
        return [Route(a.name, message) for a in chosen]


def _terms(agent: AgentInfo, *, services: bool = True) -> list[str]:
    parts = re.split(r"[^a-z]+", " ".join([agent.name, *(agent.services if services else [])]).lower())
    return [p for p in parts if len(p) >= 4 and p not in ("agent", "manager")]


def _same(word: str, term: str) -> bool:
    n = min(5, len(term))
    return len(word) >= n and word[:n] == term[:n]


__all__ = ["KEYWORD_LABEL", "AgentInfo", "KeywordRouter", "Route", "Router", "discover", "route_tool"]
