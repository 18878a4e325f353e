"""Agents: a model that manages services, using their endpoints as tools."""

from micro.agent.agent import Agent
from micro.agent.loop import EndRun, Event, Limits, Run, ToolCallRecord
from micro.agent.memory import Memory, StoreMemory
from micro.agent.tools import Tool, Toolset, function_tool, tool_name

__all__ = ["Agent", "EndRun", "Event", "Limits", "Memory", "Run", "StoreMemory", "Tool", "ToolCallRecord",
           "Toolset", "function_tool", "tool_name"]
