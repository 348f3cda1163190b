"""The tools worker: lists server-side tools and runs calls, request/reply over NATS."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter

from shared import logging as xlog
from shared.messages import ToolCall, ToolList, ToolResult
from shared.metrics import DROPPED, ERRORS, histogram
from shared.settings import Settings
from shared.subjects import QUEUE_TOOLS, Subjects
import aiohttp

from shared.agents import open_bucket
from tools_svc.plugins import Tool, builtin_tools
from tools_svc.schema import validate

log = logging.getLogger("tools_svc")

CALLS = Counter("xz_tools_calls_total", "Tool calls, by tool and outcome", ["tool", "outcome"])
CALL_SECONDS = histogram("xz_tools_call_seconds", "Tool call duration", ("tool",))


class ToolsWorker:
    name = "tools"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.nats.prefix)
        self.context: dict[str, Any] = {"settings": settings.tools, "subjects": self.subjects}
        self.tools: dict[str, Tool] = builtin_tools(self.context)
        self.nc: NATS | None = None
        self._subs: list[Any] = []
        self._http: aiohttp.ClientSession | None = None

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        self._http = aiohttp.ClientSession()
        self.context.update({"nc": nc, "http": self._http, "agents_kv": await open_bucket(nc, self.subjects.kv_agents)})
        self._subs = [
            await nc.subscribe(self.subjects.tools_list, queue=QUEUE_TOOLS, cb=self._on_list),
            await nc.subscribe(self.subjects.tools_all, queue=QUEUE_TOOLS, cb=self._on_call),
        ]
        log.info("tools ready", extra={"fields": {"tools": sorted(self.tools)}})

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        for task in list(self.context.get("tasks", ())):
            await asyncio.wait([task], timeout=5)
        if self._http is not None:
            await self._http.close()

    def health(self) -> dict[str, Any]:
        return {"ok": True, "tools": sorted(self.tools)}

    async def _on_list(self, msg: Msg) -> None:
        await msg.respond(ToolList(tools=[t.spec for t in self.tools.values()]).encode())

    async def _on_call(self, msg: Msg) -> None:
        name = msg.subject.rsplit(".", 1)[-1]
        try:
            request = ToolCall.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("tools", "bad_call").inc()
            await msg.respond(ToolResult(name=name, ok=False, action="error", text="malformed tool call").encode())
            return
        with xlog.bind(session_id=request.session_id or None, turn_id=request.turn_id or None):
            result = await self._run(name, request)
            log.info("tool call", extra={"fields": {"tool": name, "ok": result.ok, "action": result.action}})
        await msg.respond(result.encode())

    async def _run(self, name: str, request: ToolCall) -> ToolResult:
        tool = self.tools.get(name)
        if tool is None:
            CALLS.labels("unknown", "unknown_tool").inc()
            return ToolResult(name=name, ok=False, action="error", text=f"unknown tool '{name}'")
        problems = validate(request.arguments, tool.spec.parameters)
        if problems:
            CALLS.labels(name, "invalid").inc()
            return ToolResult(name=name, ok=False, action="error", text="; ".join(problems))
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(tool.call(request, self.context), 30)
            CALLS.labels(name, "ok").inc()
            return result
        except Exception as exc:  # noqa: BLE001 - a failing tool is an error result, not a crash
            ERRORS.labels("tools", "tool_failed").inc()
            CALLS.labels(name, "error").inc()
            log.exception("tool failed")
            return ToolResult(name=name, ok=False, action="error", text=f"tool failed: {type(exc).__name__}")
        finally:
            CALL_SECONDS.labels(name).observe(time.perf_counter() - started)
