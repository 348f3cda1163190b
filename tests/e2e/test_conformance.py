"""Conformance with what the firmware relies on (protocol.md §9), checked from the device side."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from shared.audio import OpusDecoder
from tests.conftest import fixture_wav
from xiaozhi.sim import SimDevice, read_wav

pytestmark = pytest.mark.e2e


async def test_reply_is_paced_for_the_device_buffer(pipeline):
    """§9.1-4: tts start before audio; no burst past the 40-frame queue; no gap within the reply;
    every frame at most 60 ms; tts stop only after play-out (firmware before 2.4.0 cuts what it
    still holds; 2.4.x drains it and gets no tail: e2e/test_playback_drain.py)."""
    async with SimDevice(ws_url=pipeline.ws_url, firmware_version="2.3.0") as device:
        mark = len(device.received)
        report = await device.type_text("Tell me a long story about a dragon and a knight.")
        assert report.error is None
        assert report.frames > 40, "the reply should be longer than the device buffer"
        assert report.events.index("tts.start") < report.events.index("audio")
        assert report.overflow_frames == 0
        assert report.lost_frames == 0  # nothing outside tts start ... tts stop
        assert report.start_gap_s is not None and report.start_gap_s >= 0.05  # time to enter speaking
        assert report.max_buffered <= 7, report.max_buffered  # ~5 ahead of real time
        assert report.underruns == 0, report.underruns
        assert report.stop_margin_s is not None and report.stop_margin_s >= 0.0, report.stop_margin_s
        # The strict device (2.3.0 flushes at tts stop) lost nothing: the gap before the first
        # frame let it enter speaking, the pacing kept within its queue, stop came after play-out.
        assert device.drops == 0, device.fw.drops
        decoder = OpusDecoder(24000)
        for item in device.received[mark:]:
            if item.kind == "audio":
                assert len(decoder.decode(item.data)) <= 1440  # ≤ the announced 60 ms
        # Paced: the reply took about as long to arrive as it takes to play.
        arrivals = [r.at for r in device.received[mark:] if r.kind == "audio"]
        assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 6) * 0.06 - 0.1


async def test_server_json_is_small(pipeline):
    """§9.7: device JSON is parsed on a microcontroller: keep every server message small."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        await device.type_text("What time is it?")
        texts = [r for r in device.received if r.kind == "json"]
        assert texts
        assert max(len(json.dumps(r.message, ensure_ascii=False).encode()) for r in texts) < 4096
        assert device.drops == 0, device.fw.drops


async def test_every_connection_is_a_fresh_session(pipeline):
    """§9.9: a reconnecting device sends a fresh hello and expects a fresh session."""
    ids = set()
    for _ in range(3):
        async with SimDevice(ws_url=pipeline.ws_url, device_id="aa:bb:cc:00:00:01") as device:
            ids.add(device.session_id)
    assert len(ids) == 3


async def test_tcp_drop_mid_reply_is_handled(pipeline):
    """§9.15: the device closes by dropping TCP (no close frame), even while a reply plays."""
    async with aiohttp.ClientSession() as http:
        async def sessions() -> float:
            async with http.get(f"http://127.0.0.1:{pipeline.metrics['gateway']}/metrics") as response:
                for line in (await response.text()).splitlines():
                    if line.startswith("xz_gateway_sessions "):
                        return float(line.split()[1])
            raise AssertionError("no session gauge")

        before = await sessions()
        device = SimDevice(ws_url=pipeline.ws_url)
        await device.connect()
        mark = len(device.received)
        await device.detect("Tell me a long story about a dragon and a knight.")
        assert await device.wait_for(lambda r: r.kind == "audio", timeout=60, start_index=mark)
        # Drop the TCP connection under the WebSocket: no close frame.
        device.ws.transport.abort()
        for _ in range(50):
            if await sessions() == before:
                break
            await asyncio.sleep(0.1)
        assert await sessions() == before
    # The gateway is fine: the next device talks normally.
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("What time is it?")
        assert report.frames > 0


async def test_dtx_uplink_and_wake_word_preroll(pipeline):
    """§9.16 and §4.2: 1-3 byte DTX packets decode; the wake-word pre-roll burst is not a turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        preroll = read_wav(fixture_wav("en_what_time.wav"))  # any speech stands in for the wake word
        mark = len(device.received)
        await device.wake_word("你好小智", preroll=preroll)
        greeting = await device.collect_turn(mark, time.monotonic(), timeout=20)
        assert greeting.sentences == ["Hi! I'm listening."] and greeting.stt is None
        await device.listen_start("auto")
        # Silence from the firmware's encoder is DTX: mostly 1-byte packets. Speech still works.
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert "time" in (report.stt or "").lower()
        assert device.drops == 0, device.fw.drops


async def test_hello_reply_first_then_mcp(pipeline):
    """§9.20 and §3.2: the hello reply comes first (within 10 s); MCP initialize after it."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        await asyncio.sleep(0.3)
        kinds = [r.message.get("type") for r in device.received if r.kind == "json"]
        assert kinds[0] == "hello"
        assert kinds[1] == "mcp"


async def test_listen_stop_in_auto_mode_ends_the_utterance(pipeline):
    """A device may stop listening early in auto mode: what it said so far is the turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = len(device.received)
        await device.listen_start("auto")
        end = await device.stream_pcm(read_wav(fixture_wav("en_what_time.wav"))[: 16000 * 1])
        await device.listen_stop()
        report = await device.collect_turn(mark, end, timeout=30)
        assert report.stt and report.events[-1] == "tts.stop"
        assert device.drops == 0, device.fw.drops


async def test_newer_turn_stops_the_playing_reply_first(pipeline):
    """A new turn while a reply plays: `tts stop`, then `tts start` (speaking -> speaking would not
    flush the device's queue), and no audio of the old reply after it."""
    # No memory for this device: when the story finished before the cancel landed (a loaded
    # machine), the small model, seeing the story in its history, may tell it again, and the
    # same sentence in the new reply would look like the old reply still playing.
    from nats.aio.client import Client as NATS

    from shared.agents import AgentConfig, save_agent
    from xiaozhi.sim import random_mac

    device_id = random_mac()
    nc = NATS()
    await nc.connect(pipeline.nats_url)
    try:
        await save_agent(await nc.jetstream().key_value("xz_agents"), device_id, AgentConfig(memory="none"))
    finally:
        await nc.close()
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        mark = len(device.received)
        await device.detect("Tell me a long story about a dragon and a knight.")
        assert await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
        second = len(device.received)
        await device.detect("What time is it?")
        stt = await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "stt", timeout=30, start_index=second)
        assert stt is not None
        at = device.received.index(stt)
        assert await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "start", timeout=10, start_index=at)
        after = device.received[at:]
        kinds = [(r.message or {}).get("state") if r.kind == "json" else r.kind for r in after]
        assert kinds[1:3] == ["stop", "start"], kinds[:6]
        start = device.received.index(stt) + 2  # the new reply begins at its `tts start`
        old_sentences = {
            r.message.get("text") for r in device.received[mark:second]
            if r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "sentence_start"
        }
        report = await device.collect_turn(start, time.monotonic(), timeout=30)
        assert stt.message.get("text") == "What time is it?"
        # The new reply is the new turn's (what the small model says about the time varies with
        # the story now in its history), and nothing of the old reply is played after it.
        assert report.sentences and not set(report.sentences) & old_sentences, (report.sentences, old_sentences)
        assert report.lost_frames == 0
        # Entering speaking for the new reply flushes what was left of the old one (that is the
        # point of stop-then-start); nothing arrived outside speaking or beyond the queue.
        assert device.fw.drops.not_speaking == {} and device.fw.drops.queue_full == 0, device.fw.drops


async def test_the_devices_agent_greets_with_its_own_words(pipeline):
    """An agent's wake-word greeting (set in the manager, read from KV) replaces the default."""
    from nats.aio.client import Client as NATS

    from shared.agents import AgentConfig, save_agent
    from xiaozhi.sim import random_mac

    device_id = random_mac()
    nc = NATS()
    await nc.connect(pipeline.nats_url)
    try:
        await save_agent(await nc.jetstream().key_value("xz_agents"), device_id, AgentConfig(name="Pete", wake_greeting="Ahoy, I am listening."))
    finally:
        await nc.close()
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        mark = len(device.received)
        await device.wake_word("hi esp")
        greeting = await device.collect_turn(mark, time.monotonic(), timeout=20)
        assert greeting.sentences == ["Ahoy, I am listening."] and greeting.frames > 0, greeting
        assert device.drops == 0, device.fw.drops
