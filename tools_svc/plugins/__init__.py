"""Server-side tools ("plugins"). Each module defines ``SPEC`` (a ToolSpec) and ``async call``."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from shared.messages import ToolCall, ToolResult, ToolSpec


class Plugin(Protocol):
    SPEC: ToolSpec

    async def call(self, request: ToolCall, context: dict[str, Any]) -> ToolResult: ...


def builtin_plugins() -> dict[str, Any]:
    """Every built-in plugin module, by tool name."""
    from tools_svc.plugins import get_time, handle_exit_intent

    modules = [get_time, handle_exit_intent]
    return {module.SPEC.name: module for module in modules}


__all__ = ["Plugin", "builtin_plugins", "ToolCall", "ToolResult", "ToolSpec", "Awaitable", "Callable"]
