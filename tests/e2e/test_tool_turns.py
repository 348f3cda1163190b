"""Tool turns through the whole pipeline, decided by the default embedded model."""

from __future__ import annotations

import json

import pytest
from nats.aio.client import Client as NATS

from shared.agents import kv_key
from tests.conftest import fixture_wav
from xiaozhi.sim import SimDevice, random_mac, read_wav

pytestmark = pytest.mark.e2e


async def test_get_time_tool_turn(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert report.sentences and report.sentences[0].startswith("It is ")
        assert " on " in report.sentences[0]  # "It is 4:05 PM on Tuesday, November 24, 2026."


async def test_play_music_streams_paced_audio(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("Play some music.")
        assert report.error is None
        assert report.sentences == ["Now playing Sunny Morning Tune.", "♪ Sunny Morning Tune"], report.sentences
        assert report.audio_s >= 4.0 + 0.8  # the intro and the 4 s song
        assert report.overflow_frames == 0 and report.underruns == 0
        assert report.max_buffered <= 7


async def test_change_role_updates_the_agent(pipeline):
    device_id = random_mac()
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        report = await device.type_text("Change your role to pirate.")
        assert report.sentences == ["Okay, from now on I am your pirate."], report.sentences
    nc = NATS()
    await nc.connect(pipeline.nats_url)
    try:
        agents = await nc.jetstream().key_value("xz_agents")
        agent = json.loads((await agents.get(kv_key(device_id))).value)
        assert "pirate" in agent["role_prompt"]
    finally:
        await nc.close()


async def test_server_mcp_tool_turn(pipeline):
    """A tool of a server-side MCP server (stdio), chosen by the embedded model from speech-like text."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("Please shout the word banana.")
        assert report.error is None and report.frames > 0
    calls = [json.loads(line) for line in pipeline.log("tools").splitlines() if '"tool call"' in line]
    shout = [c for c in calls if c.get("tool") == "demo_shout"]
    mcp_lines = [line[:300] for line in pipeline.log("tools").splitlines() if "mcp" in line.lower()][-5:]
    turn_id = next((json.loads(line).get("turn_id") for line in pipeline.log("llm").splitlines() if '"msg": "turn"' in line and "banana" in line), None)
    llm_lines = [line[:400] for line in pipeline.log("llm").splitlines() if turn_id and turn_id in line]
    assert any(c.get("ok") for c in shout), "\n".join([f"tool calls: {shout}", *mcp_lines, "llm:", *llm_lines])
