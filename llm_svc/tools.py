"""The LLM stage's view of tools: which to offer on a turn, and calling them over NATS."""

from __future__ import annotations

import json
import logging
import re
import time

from nats.aio.client import Client as NATS

from shared.messages import ToolCall, ToolList, ToolResult, ToolSpec
from shared.subjects import Subjects

log = logging.getLogger("llm_svc.tools")

_WORD = re.compile(r"[a-z0-9']+")


def relevant_tools(text: str, tools: list[ToolSpec]) -> list[ToolSpec]:
    """The tools whose keywords occur in the user's text.

    SmolLM2-135M calls a tool for almost anything when offered one ("tell me a joke" ->
    get_time). Offering a tool only when the turn mentions it keeps plain chat plain, and
    leaves the model to decide between answering and calling when it does. Tools without
    keywords are always offered.
    """
    lowered = text.lower()
    words = set(_WORD.findall(lowered))
    chosen = []
    for tool in tools:
        if not tool.keywords:
            chosen.append(tool)
            continue
        for keyword in tool.keywords:
            k = keyword.lower()
            if (k in words) if k.isascii() else (k in lowered):
                chosen.append(tool)
                break
    return chosen


class ToolClient:
    """Fetches tool schemas from tools_svc and calls tools by request/reply."""

    def __init__(self, nc: NATS, subjects: Subjects, timeout_s: float) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout_s = timeout_s
        self._tools: list[ToolSpec] = []
        self._fetched_at = 0.0

    async def list(self, max_age_s: float = 30.0) -> list[ToolSpec]:
        if time.monotonic() - self._fetched_at < max_age_s and self._fetched_at:
            return self._tools
        try:
            reply = await self.nc.request(self.subjects.tools_list, b"", timeout=1.0)
            self._tools = ToolList.decode(reply.data).tools
        except Exception as exc:  # noqa: BLE001 - no tools worker: chat without tools
            log.info("no tool list: %s", exc)
            self._tools = []
        self._fetched_at = time.monotonic()
        return self._tools

    async def call(self, name: str, raw_arguments: str, session_id: str, turn_id: str, device_id: str) -> ToolResult:
        """Validate the JSON and call; every failure comes back as an error result."""
        known = {t.name for t in self._tools}
        if name not in known:
            return ToolResult(name=name, ok=False, action="error", text=f"unknown tool '{name}'")
        try:
            arguments = json.loads(raw_arguments or "{}")
        except ValueError:
            return ToolResult(name=name, ok=False, action="error", text="arguments are not valid JSON")
        if not isinstance(arguments, dict):
            return ToolResult(name=name, ok=False, action="error", text="arguments must be a JSON object")
        request = ToolCall(session_id=session_id, turn_id=turn_id, device_id=device_id, name=name, arguments=arguments)
        try:
            reply = await self.nc.request(self.subjects.tool(name), request.encode(), timeout=self.timeout_s)
            return ToolResult.decode(reply.data)
        except Exception as exc:  # noqa: BLE001
            return ToolResult(name=name, ok=False, action="error", text=f"tool call failed: {type(exc).__name__}")
