"""The funasr engine end to end: spoken turns from the strict simulated device through the real
pipeline to the FunASR runtime stand-in (tests/standins/funasr.py, the WebSocket protocol of
modelscope/FunASR runtime/docs/websocket_protocol.md), in offline and 2pass mode, and what
happens when the server fails (never answers, drops the connection mid-utterance, answers
garbage, a final with no text, nobody listening): the built-in Whisper answers, counted and
logged."""

from __future__ import annotations


import pytest

from tests.conftest import log_records
from tests.e2e.asr_checks import assert_falls_back, engine_records, serving, spoken_turn
from tests.standins import funasr

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def funasr_standin():
    with serving(funasr, "funasr") as seen:
        yield seen


async def test_an_agent_on_the_funasr_engine_is_transcribed_there(pipeline, funasr_standin):
    mark = len(funasr_standin)
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="funasr", asr_hotwords=["Xiaozhi", "小智"])
    assert report.stt == "What time is it?", report
    assert report.frames > 0 and report.stopped
    (record,) = engine_records(pipeline, session)
    assert record["engine"] == "funasr"
    (connection,) = funasr_standin[mark:]
    assert connection["protocol"] == "binary"
    start = connection["start"]
    assert start["mode"] == "offline" and start["wav_format"] == "pcm" and start["audio_fs"] == 16000 and start["is_speaking"] is True
    assert start["hotwords"] == '{"Xiaozhi": 20, "小智": 20}'  # the agent's hotwords, as the JSON string the server parses
    assert connection["end"] == {"is_speaking": False}


@pytest.mark.parametrize("engine", ["funasr", "funasr-2pass"])
async def test_mandarin_on_the_funasr_engine(pipeline, funasr_standin, engine):
    mark = len(funasr_standin)
    report, session = await spoken_turn(pipeline, "zh_what_time.wav", asr_model=engine, language="zh")
    assert sum(1 for char in "现在几点了" if char in (report.stt or "")) >= 4, report.stt
    assert funasr_standin[mark:][0]["start"]["svs_lang"] == "zh"
    assert engine_records(pipeline, session)[0]["engine"] == engine


async def test_2pass_partials_while_the_audio_streams_then_the_final(pipeline, funasr_standin):
    mark = len(funasr_standin)
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="funasr-2pass")
    assert report.stt == "What time is it?", report
    assert engine_records(pipeline, session)[0]["engine"] == "funasr-2pass"
    (connection,) = funasr_standin[mark:]
    assert connection["start"]["mode"] == "2pass" and connection["start"]["chunk_size"] == [5, 10, 5]
    assert connection["partials"], connection  # the stand-in sent 2pass-online results
    (final,) = log_records(pipeline.log("asr"), "FunASR final", session)
    assert final["mode"] == "2pass" and final["partials"] == len(connection["partials"]), final  # and the engine took each in


@pytest.mark.parametrize(
    ("engine", "reason"),
    [("funasr-slow", "timeout"), ("funasr-die", "server"), ("funasr-garbage", "protocol"), ("funasr-empty", "server"), ("funasr-notext", "protocol"), ("funasr-dead", "unavailable")],
)
async def test_a_failing_funasr_server_falls_back_to_the_built_in_whisper(pipeline, funasr_standin, engine, reason):
    await assert_falls_back(pipeline, engine, reason)


@pytest.mark.parametrize(
    ("engine", "quoted"),
    [
        ("funasr-garbage", "not a FunASR message: '<html><body><h1>502 Bad Gateway</h1>"),
        ("funasr-empty", 'FunASR final with empty text: {"text": "", "mode": "offline"'),
        ("funasr-notext", 'FunASR final without text: {"mode": "offline", "is_final": false'),
    ],
)
async def test_the_failure_quotes_what_the_server_said(pipeline, funasr_standin, engine, quoted):
    _, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model=engine)
    (failure,) = log_records(pipeline.log("asr"), "ASR engine failed", session)
    assert quoted in failure["error"], failure
