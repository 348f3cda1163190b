"""ASR engines chosen per agent, end to end: spoken turns from the strict simulated device
through the real pipeline to a remote engine's stand-in (tests/standins), and what happens when
the engine fails (a wrong key, quota, garbage, a slow answer, nobody listening): the fallback
answers, counted and logged; with no fallback the device hears the spoken sorry."""

from __future__ import annotations


import pytest

from tests.conftest import log_records
from tests.e2e.asr_checks import assert_falls_back, engine_records, serving, spoken_turn
from tests.standins import openai_asr

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def openai_standin():
    with serving(openai_asr, "openai") as seen:
        yield seen


async def test_an_agent_on_the_openai_engine_is_transcribed_there(pipeline, openai_standin):
    mark = len(openai_standin)
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="openai", asr_hotwords=["Xiaozhi"])
    assert report.stt == "What time is it?", report
    assert report.frames > 0 and report.stopped
    (record,) = engine_records(pipeline, session)
    assert record["engine"] == "openai"
    (request,) = openai_standin[mark:]
    assert request["model"] == "whisper-1" and request["response_format"] == "json"
    assert request["prompt"].startswith("Xiaozhi")  # the agent's hotwords steer a Whisper server


async def test_mandarin_on_the_openai_engine(pipeline, openai_standin):
    mark = len(openai_standin)
    report, session = await spoken_turn(pipeline, "zh_what_time.wav", asr_model="openai", language="zh")
    assert sum(1 for char in "现在几点了" if char in (report.stt or "")) >= 4, report.stt
    assert openai_standin[mark:][0]["language"] == "zh"
    assert engine_records(pipeline, session)[0]["engine"] == "openai"


@pytest.mark.parametrize(
    ("engine", "reason"),
    [("openai-badkey", "auth"), ("openai-quota", "quota"), ("openai-garbage", "protocol"), ("openai-slow", "timeout"), ("dead", "unavailable")],
)
async def test_a_failing_engine_falls_back_to_the_built_in_whisper(pipeline, openai_standin, engine, reason):
    await assert_falls_back(pipeline, engine, reason)


async def test_the_bad_key_error_names_the_vendors_answer(pipeline, openai_standin):
    _, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="openai-badkey")
    (failure,) = log_records(pipeline.log("asr"), "ASR engine failed", session)
    assert "HTTP 401 invalid_api_key: Incorrect API key provided" in failure["error"], failure
    assert "sk-test-revoked" not in failure["error"]  # the key itself is not logged in full


async def test_no_engine_left_the_device_hears_the_sorry(pipeline):
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="dead-alone")
    assert report.stt is None
    assert report.sentences == ["Sorry, something went wrong. Please say that again."], report
    assert report.frames > 0 and report.stopped
    assert log_records(pipeline.log("asr"), "no engine transcribed the utterance", session)
    assert [r["reason"] for r in log_records(pipeline.log("gateway"), "saying a fixed phrase", session)] == ["asr_failed"]


async def test_an_engine_the_deployment_lacks_uses_the_default(pipeline):
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="no-such-engine")
    assert report.stt == "What time is it?", report
    assert engine_records(pipeline, session)[0]["engine"] == "tiny.en"


async def test_the_agents_corrections_fix_what_every_engine_heard(pipeline, openai_standin):
    for engine in ("tiny.en", "openai"):
        report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model=engine, asr_corrections={"what time": "Which hour", "hour": "never applied twice"})
        assert report.stt == "Which hour is it?", (engine, report)
        (record,) = engine_records(pipeline, session)
        assert record["text"] == "What time is it?" and record["corrected"] == "Which hour is it?"
