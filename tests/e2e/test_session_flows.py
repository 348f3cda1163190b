"""Wake word, exit command, exit intent, idle endings and voice barge-in, end to end."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import fixture_wav, start_gateway
from xiaozhi.sim import SimDevice, read_wav

pytestmark = pytest.mark.e2e


def tts(state: str):
    return lambda r: r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == state


async def wait_closed(device: SimDevice, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if device.closed:
            return True
        await asyncio.sleep(0.05)
    return device.closed


async def test_wake_word_gets_a_cached_greeting_without_llm(pipeline):
    for attempt in range(2):  # the second greeting comes from the TTS worker's clip cache
        async with SimDevice(ws_url=pipeline.ws_url) as device:
            mark = len(device.received)
            await device.detect("你好小智")
            await device.listen_start("auto")
            report = await device.collect_turn(mark, time.monotonic(), timeout=20)
            assert report.stt is None  # a greeting, not a user turn
            assert report.events[0] == "tts.start" and report.events[-1] == "tts.stop"
            assert report.sentences == ["Hi! I'm listening."]
            assert report.frames > 5
            # The clip is ready at once; still, the device needs a moment to enter speaking.
            assert report.start_gap_s is not None and report.start_gap_s >= 0.05
            assert report.lost_frames == 0
    assert "sentence from clip cache" in pipeline.log("tts")


async def test_exit_command_closes_the_session(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("退出。")
        assert report.stt == "退出。"
        assert report.events[:2] == ["stt", "tts.start"] and report.events[-1] == "tts.stop"
        assert report.frames == 0
        assert await wait_closed(device, 3)


async def test_exit_intent_says_goodbye_then_closes(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.speak(read_wav(fixture_wav("en_goodbye.wav")))
        assert "goodbye" in (report.stt or "").lower()
        assert report.events[-1] == "tts.stop" and report.frames > 0
        assert await wait_closed(device, 3), "the session stayed open after the goodbye"


@pytest.fixture
def idle_gateway(pipeline):
    """A second gateway on the same pipeline, with short idle limits."""
    gateway = start_gateway(pipeline.stack, idle_farewell_s="3", hard_close_s="6")
    yield gateway.ws_url
    gateway.stop()


async def test_idle_farewell_then_close(idle_gateway):
    async with SimDevice(ws_url=idle_gateway) as device:
        await device.listen_start("auto")
        device.start_mic()  # silence, as a device left listening
        stop = await device.wait_for(tts("stop"), timeout=30)
        assert stop is not None, "no farewell"
        spoken = [r for r in device.received if r.kind == "json" and r.message.get("state") == "sentence_start"]
        assert spoken and all(not r.message.get("text", "").startswith("Hi!") for r in spoken)
        assert not any(r.kind == "json" and r.message.get("type") == "stt" for r in device.received)
        assert await wait_closed(device, 3)
        await device.stop_mic()


async def test_hard_close_of_a_silent_connection(idle_gateway):
    async with SimDevice(ws_url=idle_gateway) as device:
        started = time.monotonic()
        assert await wait_closed(device, 12)
        assert 5 <= time.monotonic() - started <= 9
        assert not any(tts("start")(r) for r in device.received)


async def test_voice_barge_in_in_realtime_mode(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        await device.listen_start("realtime")
        device.start_mic()
        mark = len(device.received)
        await device.detect("Tell me a long story about a dragon and a knight.")
        first = await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
        assert first is not None
        device.mic_say(read_wav(fixture_wav("en_what_time.wav")))
        stop = await device.wait_for(tts("stop"), timeout=10, start_index=mark)
        assert stop is not None, "speech over the reply did not stop it"
        # The interruption is answered as a new turn.
        stt = await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "stt", timeout=20, start_index=device.received.index(stop))
        assert stt is not None and "time" in stt.message["text"].lower()
        await device.stop_mic()
