"""Flows: event-driven orchestration, durable on JetStream: one model step per event, or a stepped flow
(``Call``, ``LLM``, ``Dispatch``, ``Await``, ``Loop``, ``Verify``, functions), on a trigger, a schedule or directly."""

from micro.flow.flow import Flow
from micro.flow.record import FlowRun, RunStore, StepInfo, ToolCallResult, Waiting
from micro.flow.schedule import Schedule
from micro.flow.steps import LLM, Await, Call, Dispatch, Fn, Loop, State, Step, Verify
from micro.flow.template import TemplateError, render

__all__ = ["LLM", "Await", "Call", "Dispatch", "Flow", "FlowRun", "Fn", "Loop", "RunStore", "Schedule", "State",
           "Step", "StepInfo", "TemplateError", "ToolCallResult", "Verify", "Waiting", "render"]
