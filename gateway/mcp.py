"""The gateway as MCP client of the device's own MCP server (protocol.md §5.6), as a pure core.

After hello the gateway sends ``initialize`` (id 1, with the vision URL and token), then
``tools/list`` (id 2, repeated with ``cursor`` while the device returns ``nextCursor``). Calls
made on behalf of the LLM get numeric ids from 100 up, so they never collide with those two.
The firmware's rules: ids are numbers, errors carry only ``message``, notifications get no reply.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from shared.toolnames import sanitise_name

INIT_ID = 1
LIST_ID = 2
FIRST_CALL_ID = 100
PROTOCOL_VERSION = "2024-11-05"
MAX_PAGES = 50


def initialize(vision_url: str | None, vision_token: str | None) -> dict[str, Any]:
    capabilities: dict[str, Any] = {"roots": {"listChanged": True}, "sampling": {}}
    if vision_url:
        capabilities["vision"] = {"url": vision_url, "token": vision_token or ""}
    return {
        "jsonrpc": "2.0",
        "id": INIT_ID,
        "method": "initialize",
        "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": capabilities, "clientInfo": {"name": "xiaozhi-nats", "version": "0.1.0"}},
    }


def tools_list(cursor: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": LIST_ID, "method": "tools/list"}
    if cursor:
        message["params"] = {"cursor": cursor}
    return message


@dataclass
class DeviceTool:
    name: str  # the device's own name, e.g. self.audio_speaker.set_volume
    description: str
    input_schema: dict[str, Any]

    @property
    def llm_name(self) -> str:
        return sanitise_name(self.name)


@dataclass
class McpState:
    """The MCP conversation with one device: what was asked, what the device offers."""

    initialized: bool = False
    server_info: dict[str, Any] = field(default_factory=dict)
    tools: list[DeviceTool] = field(default_factory=list)
    listing_done: bool = False
    pages: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(FIRST_CALL_ID))

    def next_call_id(self) -> int:
        return next(self._ids)

    def on_initialize_result(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The device answered initialize: ask for its tools."""
        result = payload.get("result")
        self.initialized = isinstance(result, dict)
        if isinstance(result, dict) and isinstance(result.get("serverInfo"), dict):
            self.server_info = result["serverInfo"]
        return tools_list()

    def on_tools_list_result(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """One page of tools; returns the request for the next page, or None when done."""
        self.pages += 1
        result = payload.get("result")
        if not isinstance(result, dict):
            self.listing_done = True
            return None
        tools = result.get("tools")
        for tool in tools if isinstance(tools, list) else []:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            schema = tool.get("inputSchema") if isinstance(tool.get("inputSchema"), dict) else {"type": "object", "properties": {}}
            if any(t.name == tool["name"] for t in self.tools):
                continue
            self.tools.append(DeviceTool(tool["name"], str(tool.get("description") or ""), schema))
        cursor = result.get("nextCursor")
        if isinstance(cursor, str) and cursor and self.pages < MAX_PAGES:
            return tools_list(cursor)
        self.listing_done = True
        return None

    def find(self, name: str) -> DeviceTool | None:
        """A tool by its device name or its sanitised LLM name."""
        for tool in self.tools:
            if name in (tool.name, tool.llm_name):
                return tool
        return None


def call_request(call_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def result_text(payload: dict[str, Any]) -> tuple[bool, str]:
    """(ok, text) from a tools/call reply: the text parts joined, or the error message."""
    if isinstance(payload.get("error"), dict):
        return False, str(payload["error"].get("message") or "device error")
    result = payload.get("result")
    if not isinstance(result, dict):
        return False, "malformed reply"
    content = result.get("content")
    texts = [str(c.get("text", "")) for c in (content if isinstance(content, list) else []) if isinstance(c, dict) and c.get("type") == "text"]
    return not bool(result.get("isError")), "\n".join(texts)
