"""Devices in real homes: odd bytes in text frames, slow device tools, gateway restarts."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.messages import DeviceMcpRequest
from tests.e2e.test_device_mcp import device_mcp, wait_listed
from xiaozhi import prom
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

SORRY = "Sorry, something went wrong. Please say that again."
GBK_SSID = "家里的网络".encode("gbk")


async def invalid_utf8_count(port: int) -> float:
    return prom.value(await asyncio.to_thread(prom.scrape, port), "xz_gateway_invalid_utf8_total")


async def test_gbk_wifi_name_in_the_device_status_does_not_end_the_session(pipeline):
    """cJSON passes bytes >= 0x80 through: a GBK SSID makes the status reply's text frame
    invalid UTF-8. It is read with replacements and counted; the session goes on."""
    before = await invalid_utf8_count(pipeline.metrics["gateway"])
    async with SimDevice(ws_url=pipeline.ws_url, status_ssid_bytes=GBK_SSID) as device:
        await wait_listed(device, 1)
        status = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="self.get_device_status"))
        assert status.ok, status
        network = json.loads(status.text)["network"]
        assert "\ufffd" in network["ssid"] and network["type"] == "wifi"
        assert await invalid_utf8_count(pipeline.metrics["gateway"]) >= before + 1
        # The same connection still serves a whole turn.
        report = await device.type_text("What time is it?")
        assert report.error is None and report.stopped and report.frames > 0, report
        assert not device.closed and device.ws.close_code is None


# Message shapes the firmware sends that start no turn; {} is where the raw bytes go.
TEMPLATES = [
    b'{"type":"mcp","payload":{"jsonrpc":"2.0","id":777,"result":{"content":[{"type":"text","text":"{}"}],"isError":false}}}',
    b'{"type":"mcp","payload":{"jsonrpc":"2.0","method":"notifications/{}","params":{}}}',
    b'{"type":"listen","state":"start","mode":"{}"}',
    b'{"type":"listen","state":"stop","note":"{}"}',
    b'{"type":"abort","reason":"{}"}',
    b'{"type":"ping","{}":"{}"}',
    b'{"type":"iot","update":true,"states":[{"name":"{}","state":{}}]}',
    b'{"type":"{}"}',
    b'{"type":"hello","version":1,"features":{"mcp":true},"board":"{}"}',
]

high_bytes = st.binary(min_size=1, max_size=24).map(lambda b: bytes(x | 0x80 for x in b))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(template=st.sampled_from(TEMPLATES), raw=high_bytes, session_id=st.booleans())
def test_bytes_over_0x80_in_text_frames_never_close_the_session(pipeline, device_loop, template, raw, session_id):
    """Arbitrary bytes >= 0x80 inside otherwise valid JSON text frames: the session stays."""
    device, loop = device_loop
    frame = template.replace(b"{}", raw)
    if session_id:
        frame = b'{"session_id":"' + device.session_id.encode() + b'",' + frame[1:]

    async def send_then_ping() -> None:
        mark = len(device.received)
        await device.send_raw_text(frame)
        await device.send_json({"type": "ping"})
        pong = await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "pong", timeout=5, start_index=mark)
        assert pong is not None and not device.closed, (frame, device.ws.close_code)

    loop.run_until_complete(send_then_ping())


@pytest.fixture(scope="module")
def device_loop(pipeline):
    """One device connection (on its own event loop) for every example of the property."""
    loop = asyncio.new_event_loop()
    device = SimDevice(ws_url=pipeline.ws_url)
    loop.run_until_complete(device.connect())
    try:
        yield device, loop
        # After all the examples: still the same session, and it still answers a turn.
        report = loop.run_until_complete(device.type_text("What time is it?"))
        assert report.error is None and report.stopped and report.frames > 0, report
    finally:
        loop.run_until_complete(device.close())
        loop.close()
