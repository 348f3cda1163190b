"""The tools worker: lists server-side tools and runs calls, request/reply over NATS."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from shared import logging as xlog
from shared.messages import HDR_PROGRESS, ToolCall, ToolList, ToolResult
from shared.metrics import DROPPED, ERRORS, histogram
from shared.settings import Settings
from shared.subjects import QUEUE_TOOLS, Subjects
import aiohttp

from shared.agents import load_agent, open_bucket
from tools_svc.mcp_endpoint import McpEndpoint
from tools_svc.mcp_servers import McpServers
from tools_svc.plugins import Tool, builtin_tools
from shared.toolschema import validate

log = logging.getLogger("tools_svc")

CALLS = Counter("xz_tools_calls_total", "Tool calls, by tool and outcome", ["tool", "outcome"])
IN_FLIGHT = Gauge("xz_tools_in_flight", "Tool calls being run now")
CALL_SECONDS = histogram("xz_tools_call_seconds", "Tool call duration", ("tool",))
CALL_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 1.0
MAX_CONCURRENT_CALLS = 64


class ToolsWorker:
    name = "tools"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.nats.prefix)
        self.context: dict[str, Any] = {"settings": settings.tools, "subjects": self.subjects, "work": settings.work}
        self.tools: dict[str, Tool] = builtin_tools(self.context)
        # Tools of configured MCP servers (<server>_<tool>), and of bridges on the MCP endpoint
        # (per agent); both are named around the plugins' names.
        self.mcp = McpServers(settings.tools.mcp_servers, reserved=lambda: set(self.tools))
        endpoint = settings.tools.mcp_endpoint
        self.endpoint = McpEndpoint(endpoint, reserved=lambda: set(self._server_tools())) if endpoint.enabled else None
        self.nc: NATS | None = None
        self._calls: set[asyncio.Task] = set()
        self._call_slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self._subs: list[Any] = []
        self._http: aiohttp.ClientSession | None = None

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        self._http = aiohttp.ClientSession()
        self.context.update({"nc": nc, "http": self._http, "agents_kv": await open_bucket(nc, self.subjects.kv_agents, self.settings.work.replicas)})
        await self.mcp.start()
        if self.endpoint is not None:
            await self.endpoint.start()
        self._subs = [
            await nc.subscribe(self.subjects.tools_list, queue=QUEUE_TOOLS, cb=self._on_list),
            await nc.subscribe(self.subjects.tools_all, queue=QUEUE_TOOLS, cb=self._on_call),
        ]
        log.info("tools ready", extra={"fields": {"tools": sorted(self._server_tools()), "mcp_servers": self.mcp.status()}})

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        if self._calls:
            # Calls in hand finish (their callers are waiting), up to the drain deadline.
            await asyncio.wait(self._calls, timeout=self.settings.nats.drain_timeout_s)
        if self.endpoint is not None:
            await self.endpoint.stop()
        await self.mcp.stop()
        for task in list(self.context.get("tasks", ())):
            await asyncio.wait([task], timeout=5)
        if self._http is not None:
            await self._http.close()

    def health(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ok": True, "tools": sorted(self._server_tools()), "mcp_servers": self.mcp.status()}
        if self.endpoint is not None:
            state["bridges"] = self.endpoint.status()
        return state

    def _server_tools(self) -> dict[str, Tool]:
        """Plugins and the connected MCP servers' tools: offered to every device."""
        return {**self.mcp.tools(), **self.tools}

    async def _agent_of(self, device_id: str) -> str:
        return (await load_agent(self.context.get("agents_kv"), device_id)).agent_id

    async def _tools_for(self, device_id: str) -> dict[str, Tool]:
        """Every tool a device may use: the server's, plus its agent's bridges' tools."""
        tools = self._server_tools()
        if self.endpoint is not None and self.endpoint.bridges:
            for name, tool in self.endpoint.tools_for(await self._agent_of(device_id)).items():
                tools.setdefault(name, tool)
        return tools

    async def _on_list(self, msg: Msg) -> None:
        # The body may name the device ({"device_id": ...}) so that its agent's bridge tools are
        # included; an empty body (or no device) gets the default agent's.
        device_id = ""
        if msg.data:
            try:
                body = json.loads(msg.data)
                device_id = str(body.get("device_id") or "") if isinstance(body, dict) else ""
            except ValueError:
                DROPPED.labels("tools", "bad_list").inc()
        tools = await self._tools_for(device_id)
        await msg.respond(ToolList(tools=[t.spec for t in tools.values()]).encode())

    async def _on_call(self, msg: Msg) -> None:
        """Each call runs in its own task (a slow tool must not hold up the others), at most
        ``MAX_CONCURRENT_CALLS`` at once."""
        if len(self._calls) >= MAX_CONCURRENT_CALLS * 4:
            # Bounded: this worker is saturated; the caller hears it at once (and may retry).
            ERRORS.labels("tools", "busy").inc()
            await self._respond(msg, ToolResult(name=msg.subject.rsplit(".", 1)[-1], ok=False, action="error", text="the tools worker is busy").encode())
            return
        task = asyncio.create_task(self._serve_call(msg))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _serve_call(self, msg: Msg) -> None:
        name = msg.subject.rsplit(".", 1)[-1]
        try:
            request = ToolCall.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("tools", "bad_call").inc()
            await self._respond(msg, ToolResult(name=name, ok=False, action="error", text="malformed tool call").encode())
            return
        progress = asyncio.create_task(self._progress(msg))
        IN_FLIGHT.inc()
        try:
            async with self._call_slots:
                with xlog.bind(session_id=request.session_id or None, turn_id=request.turn_id or None):
                    result = await self._run(name, request)
                    log.info("tool call", extra={"fields": {"tool": name, "ok": result.ok, "action": result.action}})
        finally:
            progress.cancel()
            IN_FLIGHT.dec()
        await self._respond(msg, result.encode())

    async def _progress(self, msg: Msg) -> None:
        """Tell the caller every second that this worker is alive and on it (when the caller
        asked for that with the progress header)."""
        if not msg.reply or self.nc is None or not (msg.headers or {}).get(HDR_PROGRESS):
            return  # a plain request/reply caller gets only the result
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            try:
                await self.nc.publish(msg.reply, b"", headers={HDR_PROGRESS: "1"})
            except Exception:  # noqa: BLE001
                pass

    async def _respond(self, msg: Msg, body: bytes) -> None:
        if not msg.reply:
            return
        try:
            # Not msg.respond(): it would copy the request's headers (the progress flag) onto
            # the result.
            await self.nc.publish(msg.reply, body)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - NATS away: the caller retries or times out
            ERRORS.labels("tools", "respond").inc()
            log.warning("tool reply failed: %s", exc)

    async def _run(self, name: str, request: ToolCall) -> ToolResult:
        tool = self._server_tools().get(name)
        if tool is None and self.endpoint is not None and self.endpoint.bridges:
            tool = self.endpoint.tools_for(await self._agent_of(request.device_id)).get(name)
        if tool is None:
            CALLS.labels("unknown", "unknown_tool").inc()
            server = self.mcp.down_server(name)
            if server is not None:
                return ToolResult(name=name, ok=False, action="error", text=f"tool '{name}' failed: MCP server '{server}' is not connected")
            return ToolResult(name=name, ok=False, action="error", text=f"unknown tool '{name}'")
        problems = validate(request.arguments, tool.spec.parameters)
        if problems:
            CALLS.labels(name, "invalid").inc()
            return ToolResult(name=name, ok=False, action="error", text="; ".join(problems))
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(tool.call(request, self.context), CALL_TIMEOUT_S)
            CALLS.labels(name, "ok").inc()
            return result
        except asyncio.TimeoutError:
            ERRORS.labels("tools", "tool_timeout").inc()
            CALLS.labels(name, "timeout").inc()
            log.warning("tool timed out")
            return ToolResult(name=name, ok=False, action="error", text=f"tool '{name}' timed out after {CALL_TIMEOUT_S:g} s")
        except Exception as exc:  # noqa: BLE001 - a failing tool is an error result, not a crash
            ERRORS.labels("tools", "tool_failed").inc()
            CALLS.labels(name, "error").inc()
            log.exception("tool failed")
            return ToolResult(name=name, ok=False, action="error", text=f"tool failed: {type(exc).__name__}")
        finally:
            CALL_SECONDS.labels(name).observe(time.perf_counter() - started)
