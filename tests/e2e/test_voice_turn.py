"""End-to-end: a simulated device speaks to the real pipeline (every stage its own process)."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
from nats.aio.client import Client as NATS

from shared.audio import encode_pcm, resample
from shared.messages import UserTurn, Utterance, new_turn_id
from shared.subjects import Subjects
from tests.conftest import fixture_wav
from xiaozhi.sim import SimDevice, read_wav

pytestmark = pytest.mark.e2e


def normalise(text: str | None) -> str:
    return re.sub(r"[^a-z0-9 ]", "", (text or "").lower()).strip()


def assert_reply_order(events: list[str]) -> None:
    """stt -> tts.start -> llm -> sentence_start -> audio ... -> tts.stop (last)."""
    assert events, "no events"
    assert events[-1] == "tts.stop", events
    for earlier, later in (("stt", "tts.start"), ("tts.start", "llm"), ("llm", "tts.sentence_start"), ("tts.sentence_start", "audio")):
        assert earlier in events and later in events, (earlier, later, events)
        assert events.index(earlier) < events.index(later), (earlier, later, events)
    # No audio before the first sentence_start, none after tts stop.
    assert events.index("audio") > events.index("tts.sentence_start")
    assert events.count("tts.stop") == 1


async def transcribe_via_asr(nats_url: str, pcm_24k: np.ndarray) -> str:
    """Send audio through the real ASR worker over NATS and return its transcript."""
    subjects = Subjects()
    session = "verify-" + new_turn_id()
    pcm16 = resample(pcm_24k, 24000, 16000)
    packets = encode_pcm(pcm16, 16000, 60)
    nc = NATS()
    await nc.connect(nats_url)
    try:
        sub = await nc.subscribe(subjects.llm(session))
        await nc.publish(subjects.asr(session), Utterance(session_id=session, turn_id=new_turn_id()).pack(packets))
        msg = await sub.next_msg(timeout=30)
        return UserTurn.decode(msg.data).text
    finally:
        await nc.close()


async def test_spoken_turn_what_time(pipeline):
    """(a) en_what_time.wav -> stt "What time is it?", a spoken reply, tts stop last; (b) the reply is English speech."""
    async with SimDevice(ota_url=pipeline.ota_url) as device:
        assert device.server_hello["transport"] == "websocket"
        assert device.server_hello["audio_params"]["sample_rate"] == 24000
        assert device.server_hello["audio_params"]["frame_duration"] == 60
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert report.error is None, (report, pipeline.log("gateway")[-3000:])
        assert normalise(report.stt) == "what time is it", report.stt
        assert_reply_order(report.events)
        assert len(report.sentences) >= 1 and all(s.strip() for s in report.sentences)
        assert report.latency_s is not None and report.latency_s > 0
        pcm = device.reply_audio()
    # At least 1 s of audio that decodes at 24 kHz, and it is not silence.
    assert len(pcm) >= 24000, len(pcm)
    assert np.abs(pcm.astype(np.int32)).mean() > 100
    heard = await transcribe_via_asr(pipeline.nats_url, pcm)
    words = re.findall(r"[A-Za-z]+", heard)
    assert len(words) >= 2, heard
    # The gateway measured this turn's voice-to-voice latency.
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pipeline.metrics['gateway']}/metrics") as response:
            text = await response.text()
    count = [line for line in text.splitlines() if line.startswith("xz_gateway_voice_to_voice_seconds_count")]
    assert count and float(count[0].split()[1]) >= 1


async def test_typed_text_turn(pipeline):
    """(c) `listen detect` with text that is no wake word is a user turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("Tell me a short joke.")
        assert report.error is None, report
        assert report.stt == "Tell me a short joke."
        assert_reply_order(report.events)
        assert report.audio_s >= 0.5


async def test_wake_word_detect_is_not_a_turn(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = len(device.received)
        await device.detect("你好小智")
        got = await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "stt", timeout=2, start_index=mark)
        assert got is None


async def test_abort_stops_reply_within_200ms(pipeline):
    """(d) abort during a reply: `tts stop` within 200 ms and no further audio of that turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = len(device.received)
        await device.detect("Tell me a long story about a dragon and a knight.")
        first = await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
        assert first is not None, "no reply audio"
        sent = time.monotonic()
        await device.abort()
        stop = await device.wait_for(
            lambda r: r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "stop", timeout=5, start_index=mark
        )
        assert stop is not None
        assert stop.at - sent < 0.2, f"tts stop after {(stop.at - sent) * 1000:.0f} ms"
        stop_index = device.received.index(stop)
        await asyncio.sleep(1.5)
        late = [r for r in device.received[stop_index + 1 :] if r.kind == "audio"]
        assert late == [], f"{len(late)} audio frames after tts stop"
        # The session still works: the next turn is answered.
        report = await device.type_text("What time is it?")
        assert report.error is None and report.frames > 0


async def test_two_devices_at_once(pipeline):
    """(e) Two devices talking at the same time each get their own answer."""
    async def talk(wav: str):
        async with SimDevice(ota_url=pipeline.ota_url) as device:
            return await device.speak(read_wav(fixture_wav(wav)))

    time_report, joke_report = await asyncio.gather(talk("en_what_time.wav"), talk("en_joke.wav"))
    assert normalise(time_report.stt) == "what time is it", time_report.stt
    assert "joke" in normalise(joke_report.stt), joke_report.stt
    for report in (time_report, joke_report):
        assert report.error is None
        assert_reply_order(report.events)
        assert report.frames > 0


@pytest.mark.parametrize("version", [2, 3])
async def test_binary_protocol_versions(pipeline, version):
    """Protocol v2 and v3 framing in both directions."""
    async with SimDevice(ws_url=pipeline.ws_url, protocol_version=version) as device:
        assert device.server_hello["version"] == version
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert normalise(report.stt) == "what time is it", report.stt
        assert report.frames > 0
        assert len(device.reply_audio()) > 0


async def test_manual_mode_turn(pipeline):
    """Push-to-talk: speech between `listen start manual` and `listen stop` is one turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")), mode="manual")
        assert normalise(report.stt) == "what time is it", report.stt
        assert_reply_order(report.events)


async def test_20ms_uplink_frames_like_py_xiaozhi(pipeline):
    """Other clients send 20 ms packets (py-xiaozhi): the uplink accepts 20-120 ms."""
    async with SimDevice(ws_url=pipeline.ws_url, frame_ms=20) as device:
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert normalise(report.stt) == "what time is it", report.stt
        assert report.frames > 0
