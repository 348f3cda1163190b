"""The ``aliyun`` engine end to end: spoken turns from the strict simulated device through the real
pipeline to the DashScope realtime ASR stand-in (tests/standins/aliyun.py, which speaks the
protocol of help.aliyun.com/zh/model-studio/websocket-for-paraformer-real-time-service and
alibabacloud.com/help/en/model-studio/paraformer-{client,server}-events), and every failure
(a refused key, quota, malformed audio, garbage frames, a server that never finishes, one that
drops the connection mid-utterance, nobody listening) falling back to the built-in Whisper,
counted and logged."""

from __future__ import annotations

import asyncio

import pytest

from asr_svc.providers import AsrRequest, EngineError
from asr_svc.remote.aliyun import AliyunAsrEngine
from shared.settings import AliyunAsrEngineSettings
from tests.conftest import fixture_wav, log_records
from tests.e2e.asr_checks import assert_falls_back, engine_records, serving, spoken_turn
from tests.standins import aliyun
from tests.standins import engines as standin
from xiaozhi.sim import read_wav

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def aliyun_standin():
    with serving(aliyun, "aliyun") as seen:
        yield seen


def finished_records(pipeline, session_id: str) -> list[dict]:
    return log_records(pipeline.log("asr"), "aliyun task finished", session_id)


async def test_an_agent_on_the_aliyun_engine_is_transcribed_there(pipeline, aliyun_standin):
    mark = len(aliyun_standin)
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="aliyun", language="en", asr_hotwords=["Xiaozhi"])
    assert report.stt == "What time is it?", report
    assert report.frames > 0 and report.stopped
    (record,) = engine_records(pipeline, session)
    assert record["engine"] == "aliyun"
    (task,) = aliyun_standin[mark:]
    assert task["model"] == "paraformer-realtime-v2"
    assert task["parameters"]["language_hints"] == ["en"]
    assert task["final"] == "What time is it?"
    assert task["headers"].get("User-Agent") == "xiaozhi-nats"


async def test_the_vocabulary_id_reaches_the_server_and_agent_hotwords_do_not(pipeline, aliyun_standin):
    # DashScope has no per-request hotword field: the engine's vocabulary_id is what steers it.
    mark = len(aliyun_standin)
    report, _ = await spoken_turn(pipeline, "en_what_time.wav", asr_model="aliyun", asr_hotwords=["Xiaozhi", "Kitchen lamp"])
    assert report.stt == "What time is it?", report
    (task,) = aliyun_standin[mark:]
    assert task["parameters"]["vocabulary_id"] == "vocab-xiaozhi-0001"
    assert "Xiaozhi" not in str(task["parameters"])


async def test_mandarin_on_the_aliyun_engine(pipeline, aliyun_standin):
    mark = len(aliyun_standin)
    report, session = await spoken_turn(pipeline, "zh_what_time.wav", asr_model="aliyun", language="zh")
    assert sum(1 for char in "现在几点了" if char in (report.stt or "")) >= 4, report.stt
    (task,) = aliyun_standin[mark:]
    assert task["parameters"]["language_hints"] == ["zh"]
    assert engine_records(pipeline, session)[0]["engine"] == "aliyun"


async def test_partial_results_are_sent_and_received(pipeline, aliyun_standin):
    # zh_what_time.wav is longer than a second: the stand-in sends an intermediate result
    # (sentence_end false) for each full second of audio, and the engine counts those it read.
    mark = len(aliyun_standin)
    report, session = await spoken_turn(pipeline, "zh_what_time.wav", asr_model="aliyun", language="zh")
    (task,) = aliyun_standin[mark:]
    assert task["partials"], task
    (finished,) = finished_records(pipeline, session)
    assert finished["partials"] == len(task["partials"]) and finished["sentences"] == 1, finished


async def test_a_stream_delivers_partials_to_its_listener(aliyun_standin):
    # The streaming interface itself, against the same stand-in: partials arrive while audio is
    # still being sent, before finish-task.
    cfg = AliyunAsrEngineSettings(url=f"ws://127.0.0.1:{standin.PORTS['aliyun']}/api-ws/v1/inference", api_key=aliyun.GOOD_KEY)
    engine = AliyunAsrEngine("direct", cfg, None)
    pcm = read_wav(fixture_wav("zh_what_time.wav"))
    heard: list[str] = []

    async def on_partial(text: str) -> None:
        heard.append(text)

    stream = await engine.open_stream(AsrRequest(language="zh"), on_partial)
    step = 1600
    for start in range(0, len(pcm), step):
        await stream.send(pcm[start : start + step])
    for _ in range(100):  # partials come back while the task is open
        if heard:
            break
        await asyncio.sleep(0.1)
    assert heard, "no intermediate result before finish-task"
    transcript = await stream.finish()
    assert sum(1 for char in "现在几点了" if char in transcript.text) >= 4, transcript
    assert abs(transcript.audio_s - len(pcm) / 16000) < 0.01


async def test_a_cancelled_stream_closes(aliyun_standin):
    cfg = AliyunAsrEngineSettings(url=f"ws://127.0.0.1:{standin.PORTS['aliyun']}/api-ws/v1/inference", api_key=aliyun.GOOD_KEY, model="slow")
    stream = await AliyunAsrEngine("direct", cfg, None).open_stream(AsrRequest())
    await stream.send(read_wav(fixture_wav("en_what_time.wav"))[:3200])
    await stream.cancel()
    with pytest.raises(EngineError):
        await stream.send(read_wav(fixture_wav("en_what_time.wav"))[:3200])


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        ("aliyun-badkey", "auth"),
        ("aliyun-quota", "quota"),
        ("aliyun-badaudio", "bad_audio"),
        ("aliyun-garbage", "protocol"),
        ("aliyun-slow", "timeout"),
        ("aliyun-dies", "unavailable"),
        ("aliyun-dead", "unavailable"),
    ],
)
async def test_a_failing_aliyun_engine_falls_back_to_the_built_in_whisper(pipeline, aliyun_standin, engine, reason):
    await assert_falls_back(pipeline, engine, reason)


@pytest.mark.parametrize(
    ("engine", "quoted"),
    [
        ("aliyun-badkey", "HTTP 401 InvalidApiKey: Invalid API-key provided."),
        ("aliyun-quota", "task-failed Throttling.AllocationQuota: Allocated quota exceeded, please increase your quota limit."),
        ("aliyun-badaudio", "task-failed InvalidParameter:"),
        ("aliyun-dies", "connection closed"),
    ],
)
async def test_the_failure_names_the_vendors_answer(pipeline, aliyun_standin, engine, quoted):
    _, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model=engine)
    (failure,) = log_records(pipeline.log("asr"), "ASR engine failed", session)
    assert quoted in failure["error"], failure
    assert "sk-aliyun" not in failure["error"]  # the key is never logged
