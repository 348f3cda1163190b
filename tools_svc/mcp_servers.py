"""Server-side MCP servers: the tools worker as an MCP client, serving their tools over NATS.

Configured like the common ``mcpServers`` JSON (``settings.tools.mcp_servers``)::

    {"files":   {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/data"], "env": {}},
     "weather": {"url": "http://10.0.0.5:8000/sse", "transport": "sse"},
     "home":    {"url": "http://10.0.0.6:8000/mcp", "transport": "streamable-http"}}

``transport`` (or ``type``) is ``stdio`` (the default when there is a ``command``), ``sse``, or
``streamable-http`` (also ``streamableHttp``, ``streamable_http``, ``http``; the default for a
``url`` that does not end in ``/sse``). Optional keys: ``disabled``, ``cwd``, ``headers`` (HTTP
transports), ``timeout`` (connect and list, s, default 10), ``call_timeout_s`` (default and
maximum 30), ``retry_s`` (reconnect interval, default 3), ``refresh_s`` (re-list the tools,
default 60), ``mode`` (``auto``: probe the 2026 ``server/discover`` and fall back to the
``initialize`` handshake; ``legacy``: only the handshake).

Each server is held by its own task, which connects with the official ``mcp`` SDK's transports
(``stdio_client``, ``sse_client``, ``streamable_http_client``) and ``mcp.Client``, lists its
tools (following ``nextCursor``) and offers them as ``<server>_<tool>``, sanitised to
``[A-Za-z0-9_-]`` and at most 64 characters, so they never clash with the plugins. A server that
cannot be reached, or drops, is retried every ``retry_s`` for ever; it never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import mcp.types as mt
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from shared.toolnames import name_keywords, sanitise_name, unique_name
from shared.messages import ToolCall, ToolResult, ToolSpec
from tools_svc.plugins import Tool

log = logging.getLogger("tools_svc.mcp")
# The SDK's HTTP client logs every request at INFO.
logging.getLogger("httpx2").setLevel(logging.WARNING)

# The plugins' call timeout: an MCP call never takes longer.
MAX_CALL_TIMEOUT_S = 30.0
CLIENT_INFO = mt.Implementation(name="xiaozhi-nats-tools", version="0.1.0")
_TRANSPORTS = {
    "stdio": "stdio",
    "sse": "sse",
    "streamable-http": "streamable-http",
    "streamablehttp": "streamable-http",
    "streamable_http": "streamable-http",
    "http": "streamable-http",
}

Transport = Literal["stdio", "sse", "streamable-http"]


# --- names, keywords and results, shared with the bridge endpoint ------------------------------


def keywords(*names: str) -> list[str]:
    """The words of the names (camelCase split too), as the LLM's tool gate matches them."""
    out: list[str] = []
    for name in names:
        for word in name_keywords(name or ""):
            if word not in out:
                out.append(word)
    return out


def result_text(result: mt.CallToolResult) -> str:
    """The result's text content joined; other content is named; structured content as JSON."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mt.TextContent):
            parts.append(block.text)
        elif isinstance(block, mt.EmbeddedResource) and isinstance(block.resource, mt.TextResourceContents):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{getattr(block, 'type', 'content')}]")
    text = "\n".join(p for p in parts if p)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, ensure_ascii=False)
    return text


def to_tool_result(name: str, result: mt.CallToolResult) -> ToolResult:
    text = result_text(result)
    if result.is_error:
        return ToolResult(name=name, ok=False, action="error", text=f"tool '{name}' failed: {text or 'no details'}")
    return ToolResult(name=name, action="reqllm", text=text)


def is_connection_lost(exc: BaseException) -> bool:
    """Did the call fail because the connection is gone (not because the server said no)?"""
    if isinstance(exc, MCPError):
        return exc.code == mt.CONNECTION_CLOSED and exc.error.message == "Connection closed"
    # A result that does not parse (pydantic's ValidationError is a ValueError) is the server's
    # fault, not the connection's; anything else (OSError, anyio and HTTP errors) is.
    return not isinstance(exc, (ValueError, TypeError))


def call_error(name: str, where: str, exc: BaseException, timeout_s: float) -> ToolResult:
    if (isinstance(exc, MCPError) and exc.code == mt.REQUEST_TIMEOUT) or isinstance(exc, TimeoutError):
        text = f"tool '{name}' timed out after {timeout_s:g} s ({where})"
    elif isinstance(exc, MCPError) and not is_connection_lost(exc):
        text = f"tool '{name}' failed: {where} answered error {exc.code}: {exc.error.message}"
    elif not is_connection_lost(exc):
        text = f"tool '{name}' failed: {where} sent an invalid result ({type(exc).__name__})"
    else:
        text = f"tool '{name}' failed: lost the connection to {where} ({type(exc).__name__}: {exc})"
    return ToolResult(name=name, ok=False, action="error", text=text)


async def list_all_tools(client: Client, max_pages: int = 100) -> list[mt.Tool]:
    """Every tool of the server, following ``nextCursor`` (bounded, so a bad pager cannot hang us)."""
    tools: list[mt.Tool] = []
    cursor: str | None = None
    for _ in range(max_pages):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def list_changed_handler(event: asyncio.Event) -> Callable[[Any], Any]:
    """A ``message_handler`` that sets ``event`` when the server says its tools changed."""

    async def handler(message: Any) -> None:
        if isinstance(message, mt.ToolListChangedNotification):
            event.set()

    return handler


# --- configuration -----------------------------------------------------------------------------


@dataclass
class ServerConfig:
    name: str
    transport: Transport
    command: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    call_timeout_s: float = MAX_CALL_TIMEOUT_S
    retry_s: float = 3.0
    refresh_s: float = 60.0
    mode: str = "auto"

    @classmethod
    def parse(cls, name: str, raw: dict[str, Any]) -> "ServerConfig":
        """One ``mcpServers`` entry; ValueError when it cannot work."""
        if not isinstance(raw, dict):
            raise ValueError("the entry must be an object")
        kind = str(raw.get("transport") or raw.get("type") or raw.get("transportType") or "").strip()
        if kind:
            transport = _TRANSPORTS.get(kind.lower())
            if transport is None:
                raise ValueError(f"unknown transport {kind!r} (stdio, sse or streamable-http)")
        elif raw.get("command"):
            transport = "stdio"
        elif raw.get("url"):
            transport = "sse" if str(raw["url"]).rstrip("/").endswith("/sse") else "streamable-http"
        else:
            raise ValueError("needs a 'command' (stdio) or a 'url' (sse, streamable-http)")
        if transport == "stdio" and not raw.get("command"):
            raise ValueError("a stdio server needs a 'command'")
        if transport != "stdio" and not raw.get("url"):
            raise ValueError(f"a {transport} server needs a 'url'")
        mode = str(raw.get("mode", "auto"))
        if mode not in ("auto", "legacy"):
            raise ValueError("mode must be 'auto' or 'legacy'")
        return cls(
            name=name,
            transport=transport,  # type: ignore[arg-type]
            command=str(raw.get("command") or ""),
            args=[str(a) for a in raw.get("args") or []],
            env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
            cwd=raw.get("cwd"),
            url=str(raw.get("url") or ""),
            headers={str(k): str(v) for k, v in (raw.get("headers") or {}).items()},
            connect_timeout_s=float(raw.get("timeout", 10.0)),
            call_timeout_s=min(float(raw.get("call_timeout_s", MAX_CALL_TIMEOUT_S)), MAX_CALL_TIMEOUT_S),
            retry_s=max(float(raw.get("retry_s", 3.0)), 0.1),
            refresh_s=max(float(raw.get("refresh_s", 60.0)), 1.0),
            mode=mode,
        )

    def transport_cm(self) -> Any:
        """A fresh transport (an async context manager yielding the SDK's read/write streams)."""
        if self.transport == "stdio":
            params = StdioServerParameters(command=self.command, args=self.args, env=self.env or None, cwd=self.cwd)
            return stdio_client(params, errlog=sys.stderr)
        if self.transport == "sse":
            return sse_client(self.url, headers=self.headers or None, timeout=self.connect_timeout_s)
        return _streamable_http(self.url, self.headers)


@asynccontextmanager
async def _streamable_http(url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    if not headers:
        async with streamable_http_client(url) as streams:
            yield streams
        return
    import httpx2  # the mcp SDK's HTTP client

    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


# --- one server --------------------------------------------------------------------------------


class McpServerConnection:
    """One configured server: connects, lists, serves calls, reconnects, for ever."""

    def __init__(self, config: ServerConfig, reserved: Callable[[], set[str]]) -> None:
        self.config = config
        self.name = config.name
        self._reserved = reserved
        self.client: Client | None = None
        self.tools: dict[str, Tool] = {}
        # Names this server offered while connected: a call to one while it is down is told so.
        self.offered: set[str] = set()
        self.state = "connecting"
        self.error = ""
        self.first_attempt = asyncio.Event()
        self._stop = asyncio.Event()
        self._broken = asyncio.Event()
        self._refresh = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"mcp-server-{self.name}")

    async def stop(self, timeout: float = 6.0) -> None:
        self._stop.set()
        if self.task is None:
            return
        done, _ = await asyncio.wait([self.task], timeout=timeout)
        if not done:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - anyio groups, transport errors: retry
                error = _describe(exc)
                # Warn when it goes down (or fails differently); repeats of the same failure
                # while it stays down are debug, or a server down for a day floods the log.
                level = logging.WARNING if error != self.error or self.state == "connected" else logging.DEBUG
                self.error = error
                log.log(
                    level,
                    "mcp server unavailable",
                    extra={"fields": {"server": self.name, "transport": self.config.transport, "error": error, "retry_s": self.config.retry_s}},
                )
            finally:
                self.client = None
                self.tools = {}
                self.state = "stopped" if self._stop.is_set() else "down"
                self.first_attempt.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.retry_s)
        self.state = "stopped"

    async def _attempt(self) -> None:
        """Connect in a task of its own (the SDK's client must be left in the task that entered
        it), wait at most the connect timeout for it to be ready, then until it ends."""
        ready = asyncio.Event()
        hold = asyncio.create_task(self._hold(ready), name=f"mcp-session-{self.name}")
        waiter = asyncio.create_task(ready.wait())
        try:
            await asyncio.wait({hold, waiter}, timeout=self.config.connect_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not ready.is_set():
            if not hold.done():
                hold.cancel()
                with contextlib.suppress(BaseException):
                    await hold
                raise TimeoutError(f"no answer in {self.config.connect_timeout_s:g} s")
            hold.result()  # raises why it failed
            raise ConnectionError("closed before it was ready")
        self.first_attempt.set()
        try:
            await asyncio.shield(hold)
        except asyncio.CancelledError:
            hold.cancel()
            with contextlib.suppress(BaseException):
                await hold
            raise

    async def _hold(self, ready: asyncio.Event) -> None:
        self._broken.clear()
        self._refresh.clear()
        client = Client(
            self.config.transport_cm(),
            mode=self.config.mode,
            read_timeout_seconds=self.config.connect_timeout_s,
            client_info=CLIENT_INFO,
            message_handler=list_changed_handler(self._refresh),
            cache=None,
        )
        async with client:
            try:
                self._offer(await list_all_tools(client))
                self.client = client
                self.state = "connected"
                self.error = ""
                ready.set()
                log.info(
                    "mcp server connected",
                    extra={"fields": {"server": self.name, "transport": self.config.transport, "protocol": client.protocol_version, "tools": sorted(self.tools)}},
                )
                while True:
                    waits = [asyncio.create_task(e.wait()) for e in (self._stop, self._broken, self._refresh)]
                    try:
                        await asyncio.wait(waits, timeout=self.config.refresh_s, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()
                    if self._stop.is_set():
                        return
                    if self._broken.is_set():
                        raise ConnectionError("the connection was lost")
                    self._refresh.clear()
                    # Re-list now and then: picks up changed tools and notices a dead connection.
                    self._offer(await list_all_tools(client))
            finally:
                # Withdrawn before the (possibly slow) close, so no call starts on a dying session.
                self.client = None
                self.tools = {}

    def _offer(self, tools: list[mt.Tool]) -> None:
        reserved = self._reserved()
        offered: dict[str, Tool] = {}
        for tool in tools:
            exposed = unique_name(sanitise_name(f"{self.name}_{tool.name}"), reserved | set(offered))
            spec = ToolSpec(
                name=exposed,
                description=tool.description or tool.title or f"{tool.name} (MCP server {self.name})",
                parameters=tool.input_schema or {"type": "object", "properties": {}},
                keywords=keywords(tool.name, self.name),
            )
            offered[exposed] = Tool(spec, self._caller(tool.name, exposed))
        self.tools = offered
        self.offered |= set(offered)

    def _caller(self, mcp_name: str, exposed: str) -> Callable[[ToolCall, dict[str, Any]], Any]:
        async def call(request: ToolCall, _context: dict[str, Any]) -> ToolResult:
            return await self.call(mcp_name, exposed, request.arguments)

        return call

    async def call(self, mcp_name: str, exposed: str, arguments: dict[str, Any]) -> ToolResult:
        client = self.client
        where = f"MCP server '{self.name}'"
        if client is None:
            return ToolResult(name=exposed, ok=False, action="error", text=f"tool '{exposed}' failed: {where} is not connected")
        timeout = self.config.call_timeout_s
        try:
            result = await client.call_tool(mcp_name, arguments, read_timeout_seconds=timeout)
        except Exception as exc:  # noqa: BLE001 - every failure is an error result
            if is_connection_lost(exc):
                self._broken.set()
            log.warning("mcp call failed", extra={"fields": {"server": self.name, "tool": mcp_name, "error": _describe(exc)}})
            return call_error(exposed, where, exc, timeout)
        return to_tool_result(exposed, result)


def _describe(exc: BaseException) -> str:
    """The innermost useful message of an exception (anyio wraps failures in groups)."""
    while getattr(exc, "exceptions", None):
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"[:300]


# --- all servers -------------------------------------------------------------------------------


class McpServers:
    """Every configured MCP server, and their tools as one table."""

    def __init__(self, configs: dict[str, dict[str, Any]], reserved: Callable[[], set[str]]) -> None:
        self._reserved = reserved
        self.servers: dict[str, McpServerConnection] = {}
        for name, raw in (configs or {}).items():
            if isinstance(raw, dict) and raw.get("disabled"):
                continue
            try:
                config = ServerConfig.parse(name, raw)
            except (ValueError, TypeError) as exc:
                log.error("bad mcp server config", extra={"fields": {"server": name, "error": str(exc)}})
                continue
            self.servers[name] = McpServerConnection(config, self._reserved_for(name))

    def _reserved_for(self, name: str) -> Callable[[], set[str]]:
        def reserved() -> set[str]:
            taken = set(self._reserved())
            for other, conn in self.servers.items():
                if other != name:
                    taken |= set(conn.tools)
            return taken

        return reserved

    async def start(self) -> None:
        """Connect to every server at once; wait for each one's first attempt (bounded by its
        connect timeout). Those that failed keep retrying in the background."""
        for conn in self.servers.values():
            conn.start()
        if self.servers:
            limit = max(c.config.connect_timeout_s for c in self.servers.values()) + 2.0
            await asyncio.wait([asyncio.create_task(c.first_attempt.wait()) for c in self.servers.values()], timeout=limit)

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.servers.values()), return_exceptions=True)

    def tools(self) -> dict[str, Tool]:
        out: dict[str, Tool] = {}
        for conn in self.servers.values():
            out.update(conn.tools)
        return out

    def down_server(self, name: str) -> str | None:
        """The server that offered ``name`` before it went down, if any."""
        for conn in self.servers.values():
            if conn.client is None and name in conn.offered:
                return conn.name
        return None

    def status(self) -> dict[str, str]:
        return {name: conn.state for name, conn in self.servers.items()}
