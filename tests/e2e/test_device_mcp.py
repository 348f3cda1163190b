"""The device's own MCP tools: initialize, paged tools/list, and calls made over NATS."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client as NATS

from gateway.auth import verify_vision
from shared.messages import DeviceMcpReply, DeviceMcpRequest
from shared.subjects import Subjects
from xiaozhi.sim import SimDevice, firmware_tools

pytestmark = pytest.mark.e2e
S = Subjects()


def many_tools(n: int) -> list[dict]:
    """The firmware's tools plus board tools with long descriptions: well over one 8 KB page."""
    extra = [
        {
            "name": f"self.board.gpio_{i}.set",
            "description": f"Switch general purpose output {i} on or off. " + "Board specific tool. " * 20,
            "inputSchema": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
        }
        for i in range(n)
    ]
    return firmware_tools() + extra


async def device_mcp(nats_url: str, session_id: str, request: DeviceMcpRequest, timeout: float = 10) -> DeviceMcpReply:
    nc = NATS()
    await nc.connect(nats_url)
    try:
        reply = await nc.request(S.device_mcp(session_id), request.encode(), timeout=timeout)
        return DeviceMcpReply.decode(reply.data)
    finally:
        await nc.close()


async def wait_listed(device: SimDevice, pages: int, timeout: float = 5) -> None:
    for _ in range(int(timeout * 20)):
        if sum(1 for r in device.mcp_requests if r.get("method") == "tools/list") >= pages:
            return
        await asyncio.sleep(0.05)


async def test_initialize_then_paged_tools_list(pipeline):
    tools = many_tools(50)
    assert len(json.dumps(tools)) > 3 * 8000
    async with SimDevice(ws_url=pipeline.ws_url, mcp_tools=tools) as device:
        reply = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/list"))
        requests = device.mcp_requests
        # initialize first, with id 1 and the vision capability bound to this device.
        assert requests[0]["method"] == "initialize" and requests[0]["id"] == 1
        vision = requests[0]["params"]["capabilities"]["vision"]
        assert vision["url"].startswith("http://") and vision["url"].endswith("/mcp/vision/explain")
        assert verify_vision_ok(vision["token"], device.device_id, device.session_id)
        listing = [r for r in requests if r.get("method") == "tools/list"]
        assert len(listing) >= 4, "expected several pages"
        assert all(r["id"] == 2 for r in listing)
        assert "params" not in listing[0] or not listing[0]["params"].get("cursor")
        assert all(r["params"]["cursor"] for r in listing[1:])
        # Every tool arrived, once, under a sanitised name for the LLM.
        assert reply.ok and [t.name for t in reply.tools] == [t["name"] for t in tools]
        names = {t.name: t.llm_name for t in reply.tools}
        assert names["self.audio_speaker.set_volume"] == "self_audio_speaker_set_volume"
        assert all("." not in t.llm_name for t in reply.tools)


def verify_vision_ok(token: str, device_id: str, session_id: str) -> bool:
    # The test cannot know the gateway's random key, but the token must at least be well formed
    # and bound to this device and session: base64url device id, then session id (v2).
    import base64

    parts = token.split(".")
    device, session = (base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)).decode() for p in parts[1:3])
    return len(parts) == 5 and parts[0] == "v2" and (device, session) == (device_id, session_id) and not verify_vision("wrong-key", token, device_id, 0).ok


async def test_tool_calls_reach_the_device_with_ids_from_100(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        await wait_listed(device, 1)
        ok = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="self_audio_speaker_set_volume", arguments={"volume": 35}))
        assert ok.ok and ok.text == "true"
        assert device.state["volume"] == 35
        status = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="self.get_device_status"))
        assert json.loads(status.text)["audio_speaker"]["volume"] == 35
        calls = [r for r in device.mcp_requests if r.get("method") == "tools/call"]
        assert [c["id"] for c in calls] == [100, 101]
        assert calls[0]["params"] == {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 35}}
        # The device's own error comes back as a failed result.
        missing = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="self.audio_speaker.set_volume", arguments={}))
        assert not missing.ok and "volume" in missing.text
        unknown = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="self.nope"))
        assert not unknown.ok and "no tool" in unknown.text


async def test_device_without_mcp_gets_no_mcp_messages(pipeline):
    device = SimDevice(ws_url=pipeline.ws_url)
    await device.connect(features={})
    try:
        await asyncio.sleep(0.5)
        assert device.mcp_requests == []
        reply = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/list"))
        assert reply.ok and reply.tools == []
    finally:
        await device.close()


async def test_spoken_request_calls_the_device_tool(pipeline):
    """'Set the volume to eighty.' -> ASR -> LLM picks the device's MCP tool -> the device's volume is 80."""
    from tests.conftest import fixture_wav
    from xiaozhi.sim import read_wav

    async with SimDevice(ota_url=pipeline.ota_url) as device:
        await wait_listed(device, 1)
        report = await device.speak(read_wav(fixture_wav("en_volume_80.wav")))
        assert report.error is None, report
        assert "volume" in (report.stt or "").lower()
        calls = [r for r in device.mcp_requests if r.get("method") == "tools/call"]
        assert calls and calls[0]["id"] >= 100
        assert calls[0]["params"]["name"] == "self.audio_speaker.set_volume"
        assert device.state["volume"] == 80
        assert report.events[-1] == "tts.stop" and report.frames > 0


async def test_legacy_iot_descriptors_become_tools(pipeline):
    """Firmware <= 1.7 describes 'things' with `iot` messages; they become tools and commands."""
    device = SimDevice(ws_url=pipeline.ws_url, mcp_tools=[])
    await device.connect(features={})
    try:
        await device.send_json({"type": "iot", "update": True, "descriptors": [{
            "name": "Speaker", "description": "The speaker",
            "properties": {"volume": {"description": "Current audio volume value", "type": "number"}},
            "methods": {"set_volume": {"description": "Set the audio volume", "parameters": {"volume": {"description": "An integer between 0 and 100", "type": "number"}}}},
        }]})
        await device.send_json({"type": "iot", "update": True, "states": [{"name": "Speaker", "state": {"volume": 40}}]})
        await asyncio.sleep(0.2)
        listing = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/list"))
        names = {t.llm_name: t for t in listing.tools}
        assert set(names) == {"get_speaker_volume", "speaker_set_volume"}
        assert names["speaker_set_volume"].input_schema["required"] == ["volume"]
        read = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="get_speaker_volume"))
        assert read.ok and "40" in read.text
        mark = len(device.received)
        done = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="speaker_set_volume", arguments={"volume": 65}))
        assert done.ok
        command = await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "iot", timeout=3, start_index=mark)
        assert command.message["commands"] == [{"name": "Speaker", "method": "set_volume", "parameters": {"volume": 65}}]
    finally:
        await device.close()


async def test_device_that_never_answers_times_out(pipeline):
    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, mcp_call_timeout_s="1")
    try:
        async with SimDevice(ws_url=gateway.ws_url, answer_mcp_calls=False) as device:
            await wait_listed(device, 1)
            started = asyncio.get_running_loop().time()
            reply = await device_mcp(pipeline.nats_url, device.session_id, DeviceMcpRequest(method="tools/call", name="self.get_device_status"))
            assert not reply.ok and "did not answer" in reply.text
            assert 0.9 <= asyncio.get_running_loop().time() - started < 3
    finally:
        gateway.stop()

