"""``handle_exit_intent``: the user wants to end the conversation; say goodbye and close."""

from __future__ import annotations

from typing import Any

from shared.messages import ToolCall, ToolResult, ToolSpec
from shared.phrases import has_script_of, tool_phrase

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

DEFAULT_GOODBYE = tool_phrase("goodbye", "en")


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    goodbye = request.arguments.get("say_goodbye")
    # The model's own goodbye, unless it is in another script than the agent's language.
    if isinstance(goodbye, str) and goodbye.strip() and has_script_of(goodbye, request.language):
        text = goodbye.strip()
    else:
        text = tool_phrase("goodbye", request.language)
    return ToolResult(name=SPEC.name, action="response", text=text, close_after=True)
