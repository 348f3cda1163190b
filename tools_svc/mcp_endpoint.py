"""The MCP endpoint for external bridges (the xiaozhi ecosystem's "MCP endpoint" convention).

A bridge (e.g. ``xiaozhi-mcp`` / ``mcp_pipe.py``, which pipes a local stdio MCP server) connects
as a WebSocket *client* to ``ws://host:8004/mcp/?token=<token>`` and from then on is an MCP
*server* on that socket: JSON-RPC 2.0, one message per text frame. We are the MCP client: the
official SDK's ``mcp.Client`` (legacy ``initialize`` handshake, then ``notifications/initialized``,
``tools/list`` following ``nextCursor``, and ``tools/call``) runs over :func:`websocket_transport`,
a small transport that maps frames to the SDK's message streams.

The token says which agent the bridge serves (``settings.tools.mcp_endpoint.tokens``: token ->
agent id); an unknown token is refused in the handshake with HTTP 401. A bridge's tools are
offered only to devices whose agent (``AgentConfig.agent_id``) is that agent, under their own
name sanitised (``bridge_<name>`` when it would clash with a server tool or another bridge's
tool of the same agent). When the bridge disconnects its tools go with it.

The token may also be given as the last path segment (``/mcp/<token>``) or as
``Authorization: Bearer <token>``, as some bridges do.

Against guessing and a hostile bridge (settings ``tools.mcp_endpoint.*``): tokens are at least
32 characters (refused at settings load), compared in constant time against every known token,
and an address with ``max_token_failures_per_minute`` wrong tokens is refused (429) for the rest
of the minute. A bridge's tool never takes a device tool's name (``self_*``: the device's
``self.*`` tools as the LLM sees them) or a server tool's name (renamed ``bridge_<name>``,
logged); descriptions are cut, large schemas and tools beyond the per-bridge and per-agent
bounds dropped, a tools/list listing is bounded in pages and bytes, frames in size, and frames
that are not JSON-RPC are counted and logged at most once a minute per bridge.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import anyio
import mcp.types as mt
from mcp import Client
from mcp.shared.message import SessionMessage
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from shared.messages import ToolCall, ToolResult, ToolSpec
from shared.metrics import DROPPED, ERRORS
from shared.settings import McpEndpointSettings
from tools_svc.mcp_servers import (
    CLIENT_INFO,
    MAX_CALL_TIMEOUT_S,
    call_error,
    is_connection_lost,
    keywords,
    list_changed_handler,
    to_tool_result,
)
from shared.toolnames import sanitise_name, unique_name
from tools_svc.plugins import Tool

log = logging.getLogger("tools_svc.mcp_endpoint")

BAD_FRAME_LOG_EVERY_S = 60.0
MAX_TRACKED_ADDRESSES = 4096
# Device tools as the LLM names them (self.audio_speaker.set_volume -> self_audio_speaker_...).
DEVICE_TOOL_PREFIX = "self_"


@asynccontextmanager
async def websocket_transport(ws: Any) -> AsyncIterator[tuple[Any, Any]]:
    """An MCP client transport over an open WebSocket: one JSON-RPC message per text frame.

    Yields the SDK's (read, write) streams of ``SessionMessage``, as ``stdio_client`` does.
    A frame that is not JSON-RPC is logged and skipped; the read stream ends when the socket
    closes, which fails every pending request with ``CONNECTION_CLOSED``.
    """
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    bad = {"unlogged": 0, "logged_at": float("-inf")}

    def bad_frame(text: str) -> None:
        # Counted every time, logged at most once a minute per bridge (with how many).
        DROPPED.labels("tools", "bridge_bad_frame").inc()
        bad["unlogged"] += 1
        now = time.monotonic()
        if now - bad["logged_at"] >= BAD_FRAME_LOG_EVERY_S:
            log.warning("bridge sent frames that are not JSON-RPC", extra={"fields": {"count": bad["unlogged"], "frame": text[:200], "remote": _remote(ws)}})
            bad["unlogged"], bad["logged_at"] = 0, now

    async def ws_to_session() -> None:
        async with read_writer:
            try:
                async for frame in ws:
                    text = frame.decode("utf-8", "replace") if isinstance(frame, bytes) else frame
                    text = text.strip()
                    if not text:
                        continue
                    try:
                        message = mt.jsonrpc_message_adapter.validate_json(text, by_name=False)
                    except ValueError:
                        bad_frame(text)
                        continue
                    await read_writer.send(SessionMessage(message))
            except (ConnectionClosed, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                if bad["unlogged"]:
                    log.warning("bridge sent frames that are not JSON-RPC", extra={"fields": {"count": bad["unlogged"], "remote": _remote(ws)}})

    async def session_to_ws() -> None:
        async with write_reader:
            try:
                async for session_message in write_reader:
                    await ws.send(session_message.message.model_dump_json(by_alias=True, exclude_unset=True))
            except (ConnectionClosed, anyio.ClosedResourceError, anyio.BrokenResourceError):
                await read_writer.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ws_to_session)
        tg.start_soon(session_to_ws)
        try:
            yield read_stream, write_stream
        finally:
            tg.cancel_scope.cancel()
            for stream in (read_stream, write_stream):
                await stream.aclose()


class Bridge:
    """One connected bridge: its agent, its MCP session and its tools (by offered name)."""

    def __init__(self, bridge_id: int, agent_id: str, remote: str) -> None:
        self.id = bridge_id
        self.agent_id = agent_id
        self.remote = remote
        self.client: Client | None = None
        self.server_name = ""
        self.tools: dict[str, Tool] = {}


class McpEndpoint:
    """The WebSocket endpoint bridges connect to, and the tools they offer, per agent."""

    def __init__(self, settings: McpEndpointSettings, reserved: Callable[[], set[str]]) -> None:
        self.settings = settings
        self._reserved = reserved
        self.bridges: dict[int, Bridge] = {}
        self._ids = itertools.count(1)
        self._server: Server | None = None
        self.port: int | None = None
        # SHA-256 of each token -> its agent (compared in constant time, all of them).
        self._tokens = [(hashlib.sha256(token.encode()).digest(), agent) for token, agent in settings.tokens.items()]
        # Per address: [start of its minute, wrong tokens in it], oldest first, bounded.
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    # --- lifecycle ---

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            max_size=self.settings.max_frame_bytes,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
        log.info("mcp endpoint listening", extra={"fields": {"url": f"ws://{self.settings.host}:{self.port}{self._path()}/?token=...", "agents": sorted(set(self.settings.tokens.values()))}})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- what the worker asks ---

    def tools_for(self, agent_id: str) -> dict[str, Tool]:
        """The tools of the bridges connected for ``agent_id``, by offered name."""
        out: dict[str, Tool] = {}
        for bridge in self.bridges.values():
            if bridge.agent_id == agent_id:
                for name, tool in bridge.tools.items():
                    out.setdefault(name, tool)
        return out

    def status(self) -> dict[str, int]:
        agents: dict[str, int] = {}
        for bridge in self.bridges.values():
            agents[bridge.agent_id] = agents.get(bridge.agent_id, 0) + 1
        return agents

    # --- the handshake ---

    def _path(self) -> str:
        return "/" + self.settings.path.strip("/")

    def agent_for(self, request: Request) -> str | None:
        """The agent of the request's token (query ``token``, ``/mcp/<token>`` or a Bearer header)."""
        parts = urlsplit(request.path)
        base = self._path()
        path = parts.path.rstrip("/")
        candidates = parse_qs(parts.query).get("token", [])
        if path.startswith(base + "/"):
            candidates.append(path[len(base) + 1 :])
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(auth[7:].strip())
        found: str | None = None
        for token in candidates[:3]:
            digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
            for known, agent in self._tokens:  # every one, no early exit
                if hmac.compare_digest(digest, known) and token and found is None:
                    found = agent
        return found

    def _throttled(self, address: str, failed: bool = False) -> bool:
        """Whether ``address`` has used up its wrong tokens this minute (``failed``: count one)."""
        if self.settings.max_token_failures_per_minute <= 0:  # 0: no limit
            return False
        now = time.monotonic()
        entry = self._failures.get(address)
        if entry is None or now - entry[0] >= 60.0:
            if not failed:
                return False
            entry = [now, 0.0]
        if failed:
            entry[1] += 1
            self._failures[address] = entry
            self._failures.move_to_end(address)
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        return entry[1] >= self.settings.max_token_failures_per_minute

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path.rstrip("/")
        base = self._path()
        if path != base and not path.startswith(base + "/"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        address = connection.remote_address[0] if connection.remote_address else "?"
        if self._throttled(address):
            DROPPED.labels("tools", "bridge_throttled").inc()
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many wrong tokens: try again in a minute\n")
        if self.agent_for(request) is None:
            DROPPED.labels("tools", "bridge_bad_token").inc()
            if self._throttled(address, failed=True):
                log.warning("bridge address refused for a minute: too many wrong tokens", extra={"fields": {"remote": address}})
            elif address in self._failures and self._failures[address][1] == 1:  # the first of the minute only (none counted when the limit is off)
                log.info("bridge rejected: unknown token", extra={"fields": {"remote": _remote(connection)}})
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized: unknown token\n")
        return None

    # --- one bridge ---

    async def _handle(self, ws: ServerConnection) -> None:
        agent = self.agent_for(ws.request)  # type: ignore[arg-type]
        if agent is None:  # pragma: no cover - refused in the handshake
            await ws.close(1008, "unauthorized")
            return
        if sum(1 for b in self.bridges.values() if b.agent_id == agent) >= self.settings.max_bridges_per_agent:
            DROPPED.labels("tools", "bridges_per_agent").inc()
            log.warning("bridge refused: the agent has its bridges already", extra={"fields": {"agent": agent, "remote": _remote(ws)}})
            await ws.close(1013, "too many bridges for this agent")
            return
        bridge = Bridge(next(self._ids), agent, _remote(ws))
        refresh = asyncio.Event()
        fields = {"bridge": bridge.id, "agent": agent, "remote": bridge.remote}
        self.bridges[bridge.id] = bridge  # (counted against the agent's bridges from now)
        try:
            client = Client(
                websocket_transport(ws),
                mode="legacy",
                read_timeout_seconds=self.settings.handshake_timeout_s,
                client_info=CLIENT_INFO,
                message_handler=list_changed_handler(refresh),
                cache=None,
            )
            async with client:
                bridge.client = client
                bridge.server_name = (client.server_info.name if client.server_info else "")[:64]
                self._offer(bridge, await self._list_tools(client, fields))
                log.info("bridge connected", extra={"fields": {**fields, "server": bridge.server_name, "tools": sorted(bridge.tools)}})
                closed = asyncio.create_task(ws.wait_closed())
                try:
                    while not closed.done():
                        changed = asyncio.create_task(refresh.wait())
                        await asyncio.wait({closed, changed}, return_when=asyncio.FIRST_COMPLETED)
                        changed.cancel()
                        if refresh.is_set() and not closed.done():
                            refresh.clear()
                            self._offer(bridge, await self._list_tools(client, fields))
                            log.info("bridge tools changed", extra={"fields": {**fields, "tools": sorted(bridge.tools)}})
                finally:
                    closed.cancel()
        except Exception as exc:  # noqa: BLE001 - a broken bridge is logged, never fatal
            log.warning("bridge failed", extra={"fields": {**fields, "error": f"{type(exc).__name__}: {exc}"[:300]}})
            await ws.close(1011, "mcp session failed")
        finally:
            self.bridges.pop(bridge.id, None)
            bridge.client = None
            bridge.tools = {}
            log.info("bridge disconnected", extra={"fields": fields})

    async def _list_tools(self, client: Client, fields: dict[str, Any]) -> list[mt.Tool]:
        """The bridge's tools, following ``nextCursor`` within the bounds: at most
        max_list_pages pages and max_list_bytes of tools (names, descriptions and schemas) in
        all, and max_tools_per_bridge tools kept; descriptions are cut as they arrive, so what
        is kept stays small whatever the bridge sends."""
        bounds = self.settings
        kept: list[mt.Tool] = []
        dropped: Counter[str] = Counter()
        size = 0
        cursor: str | None = None
        for _ in range(bounds.max_list_pages):
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                size += len(tool.name) + len(tool.description or "") + len(tool.title or "") + _schema_bytes(tool)
                if size > bounds.max_list_bytes:
                    dropped["bridge_list_bytes"] += 1
                elif len(kept) >= bounds.max_tools_per_bridge:
                    dropped["bridge_tools_per_bridge"] += 1
                elif _schema_bytes(tool) > bounds.max_schema_bytes:
                    dropped["bridge_schema_size"] += 1
                else:
                    if len(tool.description or "") > bounds.max_description_chars or len(tool.title or "") > 200:
                        dropped["bridge_description_cut"] += 1  # kept, with its text cut
                        tool = tool.model_copy(update={"description": (tool.description or "")[: bounds.max_description_chars], "title": (tool.title or "")[:200] or None})
                    kept.append(tool)
            cursor = page.next_cursor
            if not cursor or size > bounds.max_list_bytes or len(kept) >= bounds.max_tools_per_bridge:
                break
        else:
            if cursor:
                dropped["bridge_list_pages"] += 1  # (the tools of the pages never asked for)
        if dropped:
            for reason, count in dropped.items():
                DROPPED.labels("tools", reason).inc(count)
            log.warning("bridge tools over the bounds", extra={"fields": {**fields, **dropped, "kept": len(kept)}})
        return kept

    def _offer(self, bridge: Bridge, tools: list[mt.Tool]) -> None:
        """Name the bridge's tools: their own name; ``bridge_<name>`` when it would shadow a
        server tool, a device tool (``self_*``) or another bridge's tool of the same agent.
        The agent's bridges together offer at most max_tools_per_agent tools."""
        taken = set(self._reserved())
        others = 0
        for other in self.bridges.values():
            if other.agent_id == bridge.agent_id and other.id != bridge.id:
                taken |= set(other.tools)
                others += len(other.tools)
        room = max(0, self.settings.max_tools_per_agent - others)
        offered: dict[str, Tool] = {}
        renamed: list[str] = []
        dropped = 0
        for tool in tools:
            if len(offered) >= room:
                dropped += 1
                continue
            name = sanitise_name(tool.name)
            if name in taken or name in offered or _device_like(tool.name, name):
                new = unique_name(sanitise_name(f"bridge_{name}"), taken | set(offered))
                renamed.append(f"{tool.name[:64]} -> {new}")
                name = new
            spec = ToolSpec(
                name=name,
                description=tool.description or tool.title or tool.name,
                parameters=tool.input_schema or {"type": "object", "properties": {}},
                keywords=keywords(tool.name, bridge.server_name),
            )
            offered[name] = Tool(spec, self._caller(bridge, tool.name, name))
        bridge.tools = offered
        fields = {"bridge": bridge.id, "agent": bridge.agent_id}
        if renamed:
            ERRORS.labels("tools", "bridge_tool_renamed").inc(len(renamed))
            log.warning("bridge tools renamed: they would shadow server or device tools", extra={"fields": {**fields, "renamed": renamed[:20]}})
        if dropped:
            DROPPED.labels("tools", "bridge_tools_per_agent").inc(dropped)
            log.warning("bridge tools over the agent's bound dropped", extra={"fields": {**fields, "dropped": dropped, "max_tools_per_agent": self.settings.max_tools_per_agent}})

    def _caller(self, bridge: Bridge, mcp_name: str, exposed: str) -> Callable[[ToolCall, dict[str, Any]], Any]:
        async def call(request: ToolCall, _context: dict[str, Any]) -> ToolResult:
            client = bridge.client
            where = f"the bridge of agent '{bridge.agent_id}'"
            if client is None:
                return ToolResult(name=exposed, ok=False, action="error", text=f"tool '{exposed}' failed: {where} disconnected")
            timeout = min(self.settings.call_timeout_s, MAX_CALL_TIMEOUT_S)
            try:
                result = await client.call_tool(mcp_name, request.arguments, read_timeout_seconds=timeout)
            except Exception as exc:  # noqa: BLE001 - every failure is an error result
                log.warning("bridge call failed", extra={"fields": {"bridge": bridge.id, "tool": mcp_name, "lost": is_connection_lost(exc), "error": f"{type(exc).__name__}: {exc}"[:300]}})
                return call_error(exposed, where, exc, timeout)
            return to_tool_result(exposed, result)

        return call


def _schema_bytes(tool: mt.Tool) -> int:
    try:
        return len(json.dumps(tool.input_schema or {}, separators=(",", ":")))
    except (TypeError, ValueError):
        return 1 << 30  # not JSON: too large to offer


def _device_like(mcp_name: str, name: str) -> bool:
    """A name the device's own tools (``self.*``) have, as the LLM sees them."""
    return mcp_name.startswith("self.") or name == "self" or name.startswith(DEVICE_TOOL_PREFIX)


def _remote(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else ""
