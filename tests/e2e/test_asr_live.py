"""Streaming ASR while the user speaks (asr_svc/live.py): the VAD streams the utterance to a
claimed ASR worker as it is spoken, and the worker that pulls the turn uses the streamed text;
a stream with a gap, or one whose worker is gone, is no loss: the whole utterance is
transcribed instead."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from nats.aio.client import Client as NATS

from asr_svc.live import HDR_END, HDR_SEQ, LiveStreams, StreamFailed
from asr_svc.providers import EngineSet
from shared.audio import encode_pcm
from shared.settings import Settings
from shared.subjects import Subjects
from tests.conftest import fixture_wav, log_records
from tests.e2e.asr_checks import engine_records, serving, spoken_turn
from tests.standins import engines as standin
from tests.standins import funasr
from xiaozhi import prom
from xiaozhi.sim import read_wav

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def funasr_standin():
    with serving(funasr, "funasr") as seen:
        yield seen


def at(record: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))


async def test_the_utterance_streams_while_spoken_and_its_text_is_used(pipeline, funasr_standin):
    before = await asyncio.to_thread(prom.scrape, pipeline.metrics["asr"])
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="funasr-2pass")
    assert report.stt == "What time is it?", report
    (opened,) = log_records(pipeline.log("asr"), "streaming the utterance", session)
    (cut,) = log_records(pipeline.log("vad"), "utterance", session)
    # The stream opened while the user spoke: before the VAD's end of turn, same turn id.
    assert opened["turn_id"] == cut["turn_id"] and at(opened) < at(cut), (opened, cut)
    (record,) = engine_records(pipeline, session)
    assert record["engine"] == "funasr-2pass"
    assert not log_records(pipeline.log("asr"), "streamed text unavailable: transcribing the whole utterance", session)
    window = prom.delta(await asyncio.to_thread(prom.scrape, pipeline.metrics["asr"]), before)
    assert prom.value(window, "xz_asr_live_streams_total", outcome="streamed") == 1
    assert prom.value(window, "xz_asr_partials_total", engine="funasr-2pass") >= 1


async def test_an_agent_on_a_whole_utterance_engine_is_not_streamed(pipeline):
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="tiny.en")
    assert report.stt == "What time is it?"
    assert not log_records(pipeline.log("asr"), "streaming the utterance", session)


@pytest.fixture
async def live_worker(pipeline, funasr_standin):
    """A LiveStreams of this test's own on the pipeline's NATS, as an ASR worker holds it (its
    claim subscription is not started: the test drives the stream's subject itself)."""
    nc = NATS()
    await nc.connect(pipeline.nats_url)
    settings = Settings(asr={"engines": standin.ENGINES})
    with ThreadPoolExecutor(1) as pool:
        engines = EngineSet(settings.asr, pool)
        live = LiveStreams(nc, Subjects(), engines, agents=None, worker_id="test-worker")
        yield live, nc, engines
        await live.stop()
        await engines.close()
    await nc.close()


async def open_stream(live: LiveStreams, nc, engines, turn_id: str):
    from asr_svc.live import Live
    from asr_svc.providers import AsrRequest
    from shared.audio import OpusDecoder

    engine = await engines.get("funasr")
    stream = await engine.open_stream(AsrRequest())
    entry = Live("s-live", turn_id, "funasr", stream, OpusDecoder(16000))
    live.live[turn_id] = entry

    async def on_packet(m, e=entry):
        await live._on_packet(e, m)

    entry.sub = await nc.subscribe(Subjects().asr_live("s-live", turn_id), cb=on_packet)
    return entry


async def test_a_stream_with_a_gap_gives_no_text(live_worker):
    live, nc, engines = live_worker
    await open_stream(live, nc, engines, "t-gap")
    packets = encode_pcm(read_wav(fixture_wav("en_what_time.wav")), 16000, 60)
    subject = Subjects().asr_live("s-live", "t-gap")
    for seq, packet in enumerate(packets):
        if seq != 5:  # one packet lost on the way
            await nc.publish(subject, packet, headers={HDR_SEQ: str(seq)})
    await nc.publish(subject, b"", headers={HDR_END: str(len(packets))})
    await nc.flush()
    with pytest.raises(StreamFailed) as failed:
        await live.own_result("t-gap", 10)
    assert failed.value.reason == "gap"


async def test_a_whole_stream_gives_its_text_to_another_worker(live_worker):
    live, nc, engines = live_worker
    await open_stream(live, nc, engines, "t-ok")
    await live.start()  # answers result requests for worker "test-worker"
    packets = encode_pcm(read_wav(fixture_wav("en_what_time.wav")), 16000, 60)
    subject = Subjects().asr_live("s-live", "t-ok")
    for seq, packet in enumerate(packets):
        await nc.publish(subject, packet, headers={HDR_SEQ: str(seq)})
    await nc.publish(subject, b"", headers={HDR_END: str(len(packets))})
    reply = await nc.request(Subjects().asr_live_result("test-worker"), json.dumps({"turn_id": "t-ok"}).encode(), timeout=15)
    assert json.loads(reply.data)["text"] == "What time is it?"


async def test_a_streamer_that_is_gone_is_reported_as_such(live_worker):
    live, _, _ = live_worker
    with pytest.raises(StreamFailed) as failed:
        await live.result("no-such-worker", "t-x", 1)
    assert failed.value.reason == "streamer_gone"
