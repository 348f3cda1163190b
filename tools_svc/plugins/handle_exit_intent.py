"""``handle_exit_intent``: the user wants to end the conversation; say goodbye and close."""

from __future__ import annotations

from typing import Any

from shared.messages import ToolCall, ToolResult, ToolSpec

SPEC = ToolSpec(
    name="handle_exit_intent",
    description="Call this when the user wants to end the conversation or says goodbye.",
    parameters={
        "type": "object",
        "properties": {"say_goodbye": {"type": "string", "description": "A short goodbye to say to the user."}},
        "required": [],
    },
    keywords=["goodbye", "bye", "exit", "quit", "再见", "拜拜", "退出"],
)

DEFAULT_GOODBYE = "Goodbye! Talk to you soon."


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    goodbye = request.arguments.get("say_goodbye")
    text = goodbye.strip() if isinstance(goodbye, str) and goodbye.strip() else DEFAULT_GOODBYE
    return ToolResult(name=SPEC.name, action="response", text=text, close_after=True)
