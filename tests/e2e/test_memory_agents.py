"""Per-device memory and agent configuration, through the running pipeline and its NATS KV."""

from __future__ import annotations

import asyncio
import json

import pytest
from nats.aio.client import Client as NATS

from shared.agents import AgentConfig, kv_key, save_agent
from tests.conftest import log_records
from xiaozhi.sim import SimDevice, random_mac

pytestmark = pytest.mark.e2e


async def kv(nats_url: str, bucket: str):
    nc = NATS()
    await nc.connect(nats_url)
    return nc, await nc.jetstream().key_value(bucket)


def llm_lines(pipeline, session_id: str, msg: str) -> list[dict]:
    return log_records(pipeline.log("llm"), msg, session_id)


async def test_memory_survives_a_reconnect(pipeline):
    device_id = random_mac()
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        report = await device.type_text("My name is Anna and I love green tea.")
        assert report.stopped
    nc, memory = await kv(pipeline.nats_url, "xz_memory")
    try:
        stored = json.loads((await memory.get(kv_key(device_id))).value)
        assert stored["turns"][0] == {"role": "user", "content": "My name is Anna and I love green tea."}
        assert stored["turns"][1]["role"] == "assistant" and stored["turns"][1]["content"]
    finally:
        await nc.close()
    # A new connection (new session) of the same device starts with what was said before.
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        report = await device.type_text("What do I love to drink?")
        assert report.stopped
        prompts = llm_lines(pipeline, device.session_id, "prompt")
        assert prompts and prompts[-1]["remembered_messages"] == 2
    # Another device remembers nothing of it.
    async with SimDevice(ws_url=pipeline.ws_url) as other:
        await other.type_text("What do I love to drink?")
        assert llm_lines(pipeline, other.session_id, "prompt")[-1]["remembered_messages"] == 0


async def test_agent_config_applies_on_the_next_turn_and_summary_memory(pipeline):
    device_id = random_mac()
    nc, agents = await kv(pipeline.nats_url, "xz_agents")
    try:
        async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
            await device.type_text("Hello there.")
            assert llm_lines(pipeline, device.session_id, "prompt")[-1]["agent"] == "Xiaozhi"
            # The manager changes this device's agent during the session: the next turn uses it.
            await save_agent(agents, device_id, AgentConfig(name="Captain Pete", role_prompt="You are {name}, a cheerful pirate.", memory="summary"))
            await device.type_text("Who are you?")
            prompt = llm_lines(pipeline, device.session_id, "prompt")[-1]
            assert prompt["agent"] == "Captain Pete" and prompt["memory"] == "summary"
        # With summary memory, the end of the session writes a summary into the device's memory.
        memory = await nc.jetstream().key_value("xz_memory")
        for _ in range(100):
            stored = json.loads((await memory.get(kv_key(device_id))).value)
            if stored["summary"]:
                break
            await asyncio.sleep(0.1)
        assert stored["summary"], "no summary after the session ended"
        # memory "none": nothing is kept.
        await save_agent(agents, device_id, AgentConfig(memory="none"))
        async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
            await device.type_text("Remember this: blue.")
            assert llm_lines(pipeline, device.session_id, "prompt")[-1]["remembered_messages"] == 0
        after = json.loads((await memory.get(kv_key(device_id))).value)
        assert not any("blue" in m["content"] for m in after["turns"])
    finally:
        await nc.close()
