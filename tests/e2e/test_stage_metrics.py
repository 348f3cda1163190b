"""Every stage's Prometheus metrics, read from the real processes after real turns.

The issue asks for per-stage histograms, frame and error counters, and gauges of sessions,
turns in flight and queue depths, with no label carrying a session id. These tests talk to
the pipeline as a device would and then read each service's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import fixture_wav
from xiaozhi import prom
from xiaozhi.sim import SimDevice, read_wav

pytestmark = pytest.mark.e2e

UUID_OR_HEX_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-|[0-9a-f]{16,}")


async def scrape(pipeline, service: str) -> prom.Samples:
    return await asyncio.to_thread(prom.scrape, pipeline.metrics[service])


async def test_every_stage_measures_a_voice_turn(pipeline):
    before = {name: await scrape(pipeline, name) for name in pipeline.metrics}
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.speak(read_wav(fixture_wav("en_joke.wav")))
        assert report.error is None, report
    await asyncio.sleep(1.5)  # queue-depth gauges are sampled every second
    after = {name: await scrape(pipeline, name) for name in pipeline.metrics}
    window = {name: prom.delta(after[name], before[name]) for name in after}

    histograms = {
        "gateway": ["xz_gateway_voice_to_voice_seconds"],
        "vad": ["xz_vad_end_of_turn_delay_seconds", "xz_vad_frame_processing_seconds", "xz_vad_frame_lag_seconds"],
        "asr": ["xz_asr_seconds", "xz_asr_real_time_factor"],
        "llm": ["xz_llm_first_token_seconds", "xz_llm_first_sentence_seconds", "xz_llm_turn_seconds"],
        "tts": ["xz_tts_first_frame_seconds", "xz_tts_real_time_factor"],
    }
    for service, names in histograms.items():
        for name in names:
            assert prom.value(window[service], f"{name}_count") >= 1, (service, name)
    # One frame in 8 carries its gateway arrival time; the lag is small but never negative.
    lag = prom.buckets(window["vad"], "xz_vad_frame_lag_seconds")
    assert lag[-1][1] >= 3
    assert 0 <= prom.histogram_quantile(0.5, lag) < 1.0

    assert prom.value(window["gateway"], "xz_gateway_audio_frames_in_total") >= 20
    assert prom.value(window["gateway"], "xz_gateway_audio_frames_out_total") >= 10
    assert prom.value(window["vad"], "xz_vad_frames_total") >= 20

    # Gauges and the shared counters exist in every service, labelled by service, never by session.
    for service in ("vad", "asr", "llm", "tts", "tools"):
        assert ("xz_nats_connected", (("service", service),)) in after[service]
    queues = {
        "gateway": {"uplink", "downlink", "out", "device"},
        "vad": {"vad", "audio", "ctl"},
        "asr": {"asr"},
        "llm": {"llm", "model"},
        "tts": {"tts"},
    }
    for service, expected in queues.items():
        present = {dict(labels)["queue"] for (name, labels) in after[service] if name == "xz_queue_depth"}
        assert expected <= present, (service, present)
    assert ("xz_gateway_sessions", ()) in after["gateway"]
    assert ("xz_gateway_turns_in_flight", ()) in after["gateway"]
    for service, samples in after.items():
        for name, labels in samples:
            for key, label_value in labels:
                assert "session" not in key, (service, name, key)
                assert not UUID_OR_HEX_ID.search(label_value), (service, name, key, label_value)


async def test_turns_in_flight_follow_the_reply(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = len(device.received)
        turn = asyncio.create_task(device.type_text("Tell me a short joke."))
        started = await device.wait_for(
            lambda r: r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == "start",
            timeout=30,
            start_index=mark,
        )
        assert started is not None
        during = prom.value(await scrape(pipeline, "gateway"), "xz_gateway_turns_in_flight")
        report = await turn
        assert report.error is None, report
        await asyncio.sleep(0.5)
        after = prom.value(await scrape(pipeline, "gateway"), "xz_gateway_turns_in_flight")
    assert during >= 1
    assert after == 0
