"""The LLM stage's view of tools: which to offer on a turn, and calling them over NATS."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shared.messages import HDR_PROGRESS, DeviceMcpReply, DeviceMcpRequest, DeviceTool, ToolCall, ToolList, ToolResult, ToolSpec
from shared.subjects import Subjects
from shared.toolnames import name_keywords
from shared.toolschema import validate

log = logging.getLogger("llm_svc.tools")

_WORD = re.compile(r"[a-z0-9']+")
def relevant_tools(text: str, tools: list[ToolSpec]) -> list[ToolSpec]:
    """The tools whose keywords occur in the user's text.

    SmolLM2-135M calls a tool for almost anything when offered one ("tell me a joke" ->
    get_time). Offering a tool only when the turn mentions it keeps plain chat plain, and
    leaves the model to decide between answering and calling when it does. A tool without
    keywords (a device's MCP tool, say) is matched on the words of its name.
    """
    lowered = text.lower()
    words = set(_WORD.findall(lowered))
    chosen = []
    for tool in tools:
        for keyword in tool.keywords or name_keywords(tool.name):
            k = keyword.lower()
            if (k in words) if k.isascii() else (k in lowered):
                chosen.append(tool)
                break
    return chosen


# Silence from a tools worker this long means it died (it sends progress every second).
WORKER_SILENCE_S = 3.0
TOOL_RETRIES = 1


class WorkerLost(Exception):
    """The tools worker that took a call stopped answering mid-call."""


class ToolClient:
    """Fetches tool schemas from tools_svc and calls tools by request/reply."""

    def __init__(self, nc: NATS, subjects: Subjects, timeout_s: float) -> None:
        self.nc = nc
        self.subjects = subjects
        self.timeout_s = timeout_s
        # Every server tool name seen, for validating calls.
        self._tools: dict[str, ToolSpec] = {}
        # Per session: the device's tools by their LLM name.
        self._device: dict[str, dict[str, DeviceTool]] = {}

    async def available(self, session_id: str, device_id: str = "") -> list[ToolSpec]:
        """Server tools (for this device's agent) plus the device's own MCP tools."""
        server = await self.list(device_id)
        device = await self.device_tools(session_id)
        taken = {t.name for t in server}
        return server + [
            ToolSpec(name=t.llm_name, description=t.description, parameters=t.input_schema or {"type": "object", "properties": {}})
            for t in device.values()
            if t.llm_name not in taken
        ]

    async def device_tools(self, session_id: str) -> dict[str, DeviceTool]:
        try:
            reply = await self.nc.request(self.subjects.device_mcp(session_id), DeviceMcpRequest(method="tools/list").encode(), timeout=3.0)
            tools = {t.llm_name: t for t in DeviceMcpReply.decode(reply.data).tools}
        except Exception as exc:  # noqa: BLE001 - no gateway holds the session (e.g. a test turn)
            log.debug("no device tools: %s", exc)
            tools = {}
        self._device[session_id] = tools
        if len(self._device) > 10000:
            self._device.pop(next(iter(self._device)))
        return tools

    def device_tool_names(self, session_id: str) -> list[str]:
        return list(self._device.get(session_id, {}))

    def forget(self, session_id: str) -> None:
        self._device.pop(session_id, None)

    async def list(self, device_id: str = "") -> list[ToolSpec]:
        """The server tools this device may use (plugins, MCP servers, its agent's bridges).

        Asked on every turn (a sub-millisecond request): bridges come and go, and the agent's
        tool selection may change between turns.
        """
        try:
            body = json.dumps({"device_id": device_id}).encode() if device_id else b""
            reply = await self.nc.request(self.subjects.tools_list, body, timeout=1.0)
            tools = ToolList.decode(reply.data).tools
        except Exception as exc:  # noqa: BLE001 - no tools worker: chat without tools
            log.info("no tool list: %s", exc)
            tools = []
        self._tools.update({t.name: t for t in tools})
        return tools

    async def call(
        self, name: str, raw_arguments: str, session_id: str, turn_id: str, device_id: str,
        on_progress: Callable[[], Awaitable[None]] | None = None, **extra: Any,
    ) -> ToolResult:
        """Validate the JSON and call; every failure comes back as an error result.

        ``on_progress`` runs on each progress message of a slow server tool (one a second)."""
        try:
            arguments = json.loads(raw_arguments or "{}")
        except ValueError:
            return ToolResult(name=name, ok=False, action="error", text="arguments are not valid JSON")
        if not isinstance(arguments, dict):
            return ToolResult(name=name, ok=False, action="error", text="arguments must be a JSON object")
        device_tool = self._device.get(session_id, {}).get(name)
        if device_tool is not None:
            return await self._call_device(device_tool, arguments, session_id, turn_id)
        known = set(self._tools)
        if name not in known:
            return ToolResult(name=name, ok=False, action="error", text=f"unknown tool '{name}'")
        request = ToolCall(session_id=session_id, turn_id=turn_id, device_id=device_id, name=name, arguments=arguments, **extra)
        why = ""
        for attempt in range(1 + TOOL_RETRIES):
            try:
                reply = await self._request_watched(self.subjects.tool(name), request.encode(), on_progress)
                return ToolResult.decode(reply)
            except (WorkerLost, NoRespondersError) as exc:
                # The worker died mid-call (no word from it for WORKER_SILENCE_S) or none was
                # there: another replica gets one more try.
                why = "the tools worker died" if isinstance(exc, WorkerLost) else "no tools worker"
                log.warning("tool call lost, %s", "retrying" if attempt < TOOL_RETRIES else "giving up", extra={"fields": {"tool": name, "why": why}})
                await asyncio.sleep(0.2)
            except Exception as exc:  # noqa: BLE001
                return ToolResult(name=name, ok=False, action="error", text=f"tool call failed: {type(exc).__name__}")
        return ToolResult(name=name, ok=False, action="error", text=f"tool call failed: {why}")

    async def _request_watched(self, subject: str, body: bytes, on_progress: Callable[[], Awaitable[None]] | None = None) -> bytes:
        """Request/reply that tells a slow tool (the worker sends progress every second) from a
        dead worker (silence): :class:`WorkerLost` after ``WORKER_SILENCE_S`` of silence."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, body, reply=inbox, headers={HDR_PROGRESS: "1"})
            deadline = time.monotonic() + self.timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    msg = await sub.next_msg(timeout=min(WORKER_SILENCE_S, remaining))
                except NatsTimeoutError:
                    if remaining <= WORKER_SILENCE_S:
                        raise asyncio.TimeoutError from None
                    raise WorkerLost(subject) from None
                headers = msg.headers or {}
                if headers.get(HDR_PROGRESS) and not msg.data:
                    if on_progress is not None:
                        await on_progress()
                    continue
                if headers.get("Status") == "503":
                    raise NoRespondersError
                return msg.data
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass

    async def _call_device(self, tool: DeviceTool, arguments: dict, session_id: str, turn_id: str) -> ToolResult:
        """Call one of the device's MCP tools through the gateway that holds the session."""
        problems = validate(arguments, tool.input_schema or {})
        if problems:
            return ToolResult(name=tool.llm_name, ok=False, action="error", text="; ".join(problems))
        request = DeviceMcpRequest(method="tools/call", name=tool.name, arguments=arguments, turn_id=turn_id)
        try:
            reply = await self.nc.request(self.subjects.device_mcp(session_id), request.encode(), timeout=self.timeout_s + 1)
            answer = DeviceMcpReply.decode(reply.data)
        except Exception as exc:  # noqa: BLE001
            return ToolResult(name=tool.llm_name, ok=False, action="error", text=f"device tool call failed: {type(exc).__name__}")
        if not answer.ok:
            return ToolResult(name=tool.llm_name, ok=False, action="error", text=answer.text)
        # The vision endpoint's answer (protocol.md §8) is spoken as it is.
        try:
            parsed = json.loads(answer.text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and str(parsed.get("action", "")).upper() == "RESPONSE" and parsed.get("response"):
            return ToolResult(name=tool.llm_name, action="response", text=str(parsed["response"]))
        return ToolResult(name=tool.llm_name, action="reqllm", text=answer.text)
