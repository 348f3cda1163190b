"""Server-side tools ("plugins"). Each module defines its schema and an ``async call``.

A plugin module exposes ``SPEC`` (a ToolSpec) and ``call(request, context)``; a module whose
schema depends on configuration has ``spec(context)`` (or ``specs(context)`` for several tools)
instead. :func:`builtin_tools` gathers them into one table: name -> (schema, call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from shared.messages import ToolCall, ToolResult, ToolSpec

Call = Callable[[ToolCall, dict[str, Any]], Awaitable[ToolResult]]


@dataclass
class Tool:
    spec: ToolSpec
    call: Call


def builtin_tools(context: dict[str, Any]) -> dict[str, Tool]:
    """Every built-in tool available with this configuration, by name."""
    from tools_svc.plugins import (
        change_role,
        get_time,
        handle_exit_intent,
        home_assistant,
        lunar_date,
        news,
        play_music,
        weather,
    )

    tools = [
        Tool(get_time.SPEC, get_time.call),
        Tool(lunar_date.SPEC, lunar_date.call),
        Tool(weather.SPEC, weather.call),
        Tool(news.SPEC, news.call),
        Tool(play_music.SPEC, play_music.call),
        Tool(change_role.spec(context), change_role.call),
        Tool(handle_exit_intent.SPEC, handle_exit_intent.call),
    ]
    for spec in home_assistant.specs(context):
        tools.append(Tool(spec, home_assistant.get_state if spec.name == "hass_get_state" else home_assistant.set_state))
    return {tool.spec.name: tool for tool in tools}
