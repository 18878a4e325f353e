"""micro: an asyncio-native microservice runtime.

Services (capability), agents (intelligence) and flows (event-driven
orchestration) run as coroutine actors on one event loop, share a registry, a
broker and a store, and serve real gRPC endpoints::

    import micro

    async with micro.New("task") as service:
        service.handle(Task())
        rsp = await service.client.call("task", "Task.ListOverdue", {"user_id": "alice"})
"""

from micro import a2a, auth, context, errors, logs, telemetry, tls
from micro.agent import Agent
from micro.client import Client
from micro.codec.layout import field
from micro.facade import (
    Address,
    AgentModel,
    AgentPrompt,
    AgentProvider,
    AgentServices,
    FlowPrompt,
    FlowServices,
    FlowTrigger,
    Metadata,
    New,
    NewAgent,
    NewFlow,
    NewService,
    Option,
    RegisterTTL,
    Version,
)
from micro.flow import Flow
from micro.middleware import Request
from micro.runtime import Runtime
from micro.service import Service
from micro.service.endpoints import idempotent

__all__ = [
    "Address",
    "Agent",
    "AgentModel",
    "AgentPrompt",
    "AgentProvider",
    "AgentServices",
    "Client",
    "Flow",
    "FlowPrompt",
    "FlowServices",
    "FlowTrigger",
    "Metadata",
    "New",
    "NewAgent",
    "NewFlow",
    "NewService",
    "Option",
    "RegisterTTL",
    "Request",
    "Runtime",
    "Service",
    "Version",
    "a2a",
    "auth",
    "context",
    "errors",
    "field",
    "idempotent",
    "logs",
    "telemetry",
    "tls",
]
