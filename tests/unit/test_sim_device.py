"""The simulated device's MCP server answers as the firmware does (no network needed)."""

from __future__ import annotations

import json

from xiaozhi.sim import SimDevice, firmware_tools


def device_with_capture(**kwargs) -> tuple[SimDevice, list[dict]]:
    device = SimDevice(ws_url="ws://unused/", **kwargs)
    sent: list[dict] = []

    async def capture(message: dict) -> None:
        sent.append(message)

    device.send_json = capture  # type: ignore[method-assign]
    return device, sent


async def test_unknown_cursor_is_an_error():
    device, sent = device_with_capture()
    await device._on_mcp({"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {"cursor": "self.nope"}})
    assert sent[-1]["payload"] == {"jsonrpc": "2.0", "id": 8, "error": {"message": "Failed to add tool  because of payload size limit"}}


async def test_pages_and_cursor():
    tools = firmware_tools()
    # The firmware's arithmetic: '{"tools":[' + tool + ',' + 30 bytes of slack must fit.
    device, sent = device_with_capture(mcp_tools=tools, mcp_page_bytes=10 + len(json.dumps(tools[0], separators=(",", ":"))) + 1 + 30)
    await device._on_mcp({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    first = sent[-1]["payload"]["result"]
    assert [t["name"] for t in first["tools"]] == [tools[0]["name"]] and first["nextCursor"] == tools[1]["name"]


async def test_range_checked_arguments_and_string_ids_dropped():
    device, sent = device_with_capture()
    await device._on_mcp({"jsonrpc": "2.0", "id": 100, "method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 150}}})
    await device.mcp_idle()
    assert sent[-1]["payload"]["error"]["message"] == "Value exceeds maximum allowed: 100"
    await device._on_mcp({"jsonrpc": "2.0", "id": 101, "method": "tools/call", "params": {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 50.0}}})
    await device.mcp_idle()
    assert sent[-1]["payload"]["result"]["content"][0]["text"] == "true" and device.state["volume"] == 50
    count = len(sent)
    await device._on_mcp({"jsonrpc": "2.0", "id": "x", "method": "tools/list"})
    assert len(sent) == count  # string ids are dropped silently
