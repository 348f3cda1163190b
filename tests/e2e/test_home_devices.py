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
        # The same connection still serves whole turns, one where the model asks for the status.
        report = await device.type_text("What is the device status?")
        assert report.error is None and report.stopped and report.frames > 0, report
        calls = [r["params"]["name"] for r in device.mcp_requests if r.get("method") == "tools/call"]
        assert calls.count("self.get_device_status") >= 2, calls
        report = await device.type_text("What time is it?")
        assert report.error is None and report.stopped and report.frames > 0, report
        assert not device.closed and device.ws.close_code is None


async def test_a_first_hello_with_raw_gbk_bytes_is_answered(pipeline):
    """The very first frame (read before the session starts) is read tolerantly too."""
    import websockets

    from xiaozhi.sim import random_mac

    headers = {"Protocol-Version": "1", "Device-Id": random_mac(), "Client-Id": "8a1f0000-0000-4000-8000-0000000000aa"}
    async with websockets.connect(pipeline.ws_url, additional_headers=headers, compression=None) as ws:
        await ws.send(b'{"type":"hello","version":1,"transport":"websocket","board":"' + GBK_SSID + b'","features":{}}', text=True)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "hello" and reply["session_id"]
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"


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


@pytest.fixture
def device_loop(pipeline):
    """One device connection (on its own event loop) for every example of the property: a
    function-scoped fixture is set up once per test, not per example. Its loop runs only while
    an example does, so the teardown comes right after them (before the server's ping timeout)."""
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


async def fallbacks(port: int, reason: str) -> float:
    return prom.value(await asyncio.to_thread(prom.scrape, port), "xz_gateway_fallback_replies_total", reason=reason)


async def test_a_slow_device_tool_completes_its_turn(pipeline):
    """A device tool that answers after more than `turn_timeout_s` (within its own
    `mcp_call_timeout_s`): the turn waits for it and the real answer is spoken, no sorry."""
    from tests.conftest import start_gateway

    # Timeouts well above the model's time to a tool call and to its answer on a loaded CPU.
    gateway = start_gateway(pipeline.stack, turn_timeout_s="8", mcp_call_timeout_s="20")
    try:
        port = gateway.proc.metrics_port  # type: ignore[attr-defined]
        async with SimDevice(ws_url=gateway.ws_url, tool_delays={"self.audio_speaker.set_volume": 11.0}) as device:
            await wait_listed(device, 1)
            started = asyncio.get_running_loop().time()
            report = await device.type_text("Set the volume to 30.")
            assert report.error is None and report.stopped and report.frames > 0, report
            assert SORRY not in report.sentences, report.sentences
            calls = [r for r in device.mcp_requests if r.get("method") == "tools/call"]
            assert calls and calls[0]["params"]["name"] == "self.audio_speaker.set_volume", calls
            assert device.state["volume"] == 30
            assert asyncio.get_running_loop().time() - started > 11
            assert await fallbacks(port, "turn_timeout") == 0
    finally:
        gateway.stop()


async def test_a_device_tool_slower_than_its_timeout_ends_the_turn_cleanly(pipeline):
    """Past `mcp_call_timeout_s` the call fails, the model answers from that, the reply ends
    with `tts stop`; the device's late answer is dropped and the session goes on."""
    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, turn_timeout_s="8", mcp_call_timeout_s="10")
    try:
        port = gateway.proc.metrics_port  # type: ignore[attr-defined]
        async with SimDevice(ws_url=gateway.ws_url, tool_delays={"self.audio_speaker.set_volume": 14.0}) as device:
            await wait_listed(device, 1)
            report = await device.type_text("Set the volume to 30.")
            assert [r for r in device.mcp_requests if r.get("method") == "tools/call"]
            assert report.error is None and report.stopped, report
            assert await fallbacks(port, "turn_timeout") == 0
            await asyncio.sleep(14.5 - 10)  # the late answer comes, and is dropped
            after = await device.type_text("What time is it?")
            assert after.error is None and after.stopped and after.frames > 0, after
    finally:
        gateway.stop()


async def test_a_slow_server_tool_keeps_the_turn_alive(pipeline):
    """A server tool (an MCP server's) working for longer than `turn_timeout_s`: the tools
    worker's progress reaches the gateway through the LLM, and the answer is spoken."""
    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, turn_timeout_s="12")
    try:
        port = gateway.proc.metrics_port  # type: ignore[attr-defined]
        async with SimDevice(ws_url=gateway.ws_url) as device:
            # The model's own first answer (a cold prompt with every tool's schema) may take
            # seconds on a loaded machine: warm it up, so the watchdog judges the tool alone.
            await device.type_text("Please echo the word apple slowly, waiting 1 second.")
            report = await device.type_text("Please echo the word banana slowly, waiting 16 seconds.")
            assert report.error is None and report.stopped and report.frames > 0, report
            assert SORRY not in report.sentences, report.sentences
            assert await fallbacks(port, "turn_timeout") == 0
        results = [json.loads(line) for line in pipeline.log("llm").splitlines() if '"tool result"' in line and device.session_id in line]
        slow = [r for r in results if r.get("tool") == "demo_slow_echo"]
        assert slow and slow[-1].get("ok"), results
        assert float(json.loads(slow[-1]["arguments"] or "{}").get("seconds", 0)) > 12, slow[-1]
    finally:
        gateway.stop()


async def test_a_drain_finishes_the_long_reply_in_progress_before_it_closes(pipeline):
    """SIGTERM during a long reply: the device gets all of it, `tts stop` included, and only
    then the close (1001). A WebSocket device does not reconnect by itself: it goes idle until
    the next wake word, and that connection goes (through the load balancer) elsewhere."""
    import signal
    import time

    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, drain_s="45")
    try:
        async with SimDevice(ws_url=gateway.ws_url) as device:
            mark = len(device.received)
            turn = asyncio.create_task(device.type_text("Tell me a long story about a dragon and a knight."))
            assert await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
            gateway.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            signalled = time.monotonic()
            report = await turn
            assert report.error is None and report.stopped, report
            assert report.frames > 40 and report.lost_frames == 0, report
            stop_at = report.stop_at
            deadline = time.monotonic() + 10
            while not device.closed and device.ws.close_code is None:
                assert time.monotonic() < deadline, "the drained session was not closed"
                await asyncio.sleep(0.05)
            assert device.ws.close_code == 1001
            # Nothing came after the close; `tts stop` came before it.
            assert stop_at is not None and stop_at <= time.monotonic()
            assert time.monotonic() - signalled > 10  # the reply outlasted a short drain
        assert gateway.proc.popen.wait(30) == 0  # type: ignore[attr-defined]
    finally:
        if gateway.proc.popen.poll() is None:  # type: ignore[attr-defined]
            gateway.stop()


async def test_a_reply_longer_than_the_drain_ends_with_tts_stop_before_the_close(pipeline):
    """Past `drain_s` a reply still playing is cut, but cleanly: `tts stop`, then 1001."""
    import signal
    import time

    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, drain_s="3")
    try:
        async with SimDevice(ws_url=gateway.ws_url) as device:
            mark = len(device.received)
            turn = asyncio.create_task(device.type_text("Tell me a long story about a dragon and a knight."))
            assert await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
            gateway.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            report = await turn
            assert report.error is None and report.stopped, report
            assert report.audio_s < 10, report.audio_s  # cut at the deadline
            deadline = time.monotonic() + 10
            while not device.closed and device.ws.close_code is None:
                assert time.monotonic() < deadline, "the drained session was not closed"
                await asyncio.sleep(0.05)
            assert device.ws.close_code == 1001
            stop = max(i for i, r in enumerate(device.received) if r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "stop")
            assert all(r.kind != "audio" for r in device.received[stop + 1:]), "audio after tts stop"
        assert gateway.proc.popen.wait(30) == 0  # type: ignore[attr-defined]
    finally:
        if gateway.proc.popen.poll() is None:  # type: ignore[attr-defined]
            gateway.stop()
