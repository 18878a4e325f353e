"""Flows: event-driven orchestration, one model step per event, durable on JetStream."""

from micro.flow.flow import Flow
from micro.flow.record import FlowRun, RunStore, ToolCallResult
from micro.flow.template import TemplateError, render

__all__ = ["Flow", "FlowRun", "RunStore", "TemplateError", "ToolCallResult", "render"]
