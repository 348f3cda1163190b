"""The doubao engine (Volcengine's big-model streaming ASR, sauc bigmodel) end to end: spoken
turns from the strict simulated device through the real pipeline to the stand-in
(tests/standins/doubao.py, which speaks the protocol of https://www.volcengine.com/docs/6561/1354869
and transcribes what arrived with the packaged Whisper), its partial results, the agent's
hotwords in ``request.corpus.context``, and every failure falling back to the built-in Whisper,
counted and logged."""

from __future__ import annotations

import asyncio
import json

import pytest

from asr_svc.providers import AsrRequest, EngineError
from asr_svc.remote.doubao import DoubaoAsrEngine
from shared.settings import DoubaoAsrEngineSettings
from tests.conftest import fixture_wav, log_records
from tests.e2e.asr_checks import assert_falls_back, engine_records, serving, spoken_turn
from tests.standins import doubao as doubao_standin
from tests.standins import engines as standin
from xiaozhi.sim import read_wav

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def doubao_server():
    with serving(doubao_standin, "doubao") as seen:
        yield seen


def finished_records(pipeline, session: str) -> list[dict]:
    return log_records(pipeline.log("asr"), "doubao stream finished", session)


async def test_an_agent_on_doubao_is_transcribed_there_with_its_hotwords(pipeline, doubao_server):
    mark = len(doubao_server)
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="doubao", asr_hotwords=["Xiaozhi", "小智"])
    assert report.stt == "What time is it?", report
    assert report.frames > 0 and report.stopped
    (record,) = engine_records(pipeline, session)
    assert record["engine"] == "doubao"
    (conn,) = doubao_server[mark:]
    assert conn["token_ok"] and conn["headers"]["X-Api-App-Key"] == "1234567890"
    assert conn["headers"]["X-Api-Resource-Id"] == "volc.bigasr.sauc.duration" and len(conn["headers"]["X-Api-Connect-Id"]) == 36
    assert conn["final"] == "What time is it?"
    request = conn["request"]
    assert request["request"]["model_name"] == "bigmodel"
    assert json.loads(request["request"]["corpus"]["context"]) == {"hotwords": [{"word": "Xiaozhi"}, {"word": "小智"}]}
    # The packets: the full client request (1), audio 2, 3, ..., the last negated and flagged.
    packets = conn["packets"]
    assert packets[0] == (0b0001, 0b0001, 1)
    assert [p[2] for p in packets[1:-1]] == list(range(2, len(packets)))
    assert all(p[:2] == (0b0010, 0b0001) for p in packets[1:-1])
    assert packets[-1] == (0b0010, 0b0011, -len(packets))


async def test_partial_results_reach_the_engine(pipeline, doubao_server):
    mark = len(doubao_server)
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model="doubao")
    assert report.stt == "What time is it?", report
    (conn,) = doubao_server[mark:]
    assert conn["partials"], conn  # the stand-in sent partial text while audio came
    (finished,) = finished_records(pipeline, session)
    assert finished["engine"] == "doubao" and finished["partials"] >= 1, finished
    assert finished["logid"].startswith("2026")  # the handshake's X-Tt-Logid


async def test_mandarin_on_the_streaming_input_endpoint(pipeline, doubao_server):
    mark = len(doubao_server)
    report, session = await spoken_turn(pipeline, "zh_what_time.wav", asr_model="doubao-nostream", language="zh")
    assert sum(1 for char in "现在几点了" if char in (report.stt or "")) >= 4, report.stt
    (conn,) = doubao_server[mark:]
    assert conn["mode"] == "bigmodel_nostream" and conn["request"]["audio"]["language"] == "zh-CN"
    assert engine_records(pipeline, session)[0]["engine"] == "doubao-nostream"


@pytest.mark.parametrize(
    ("engine", "reason"),
    [
        ("doubao-badkey", "auth"),
        ("doubao-quota", "rate_limited"),
        ("doubao-badaudio", "bad_audio"),
        ("doubao-garbage", "protocol"),
        ("doubao-slow", "timeout"),
        ("doubao-die", "unavailable"),
        ("doubao-dead", "unavailable"),
    ],
)
async def test_a_failing_doubao_falls_back_to_the_built_in_whisper(pipeline, doubao_server, engine, reason):
    await assert_falls_back(pipeline, engine, reason)


@pytest.mark.parametrize(
    ("engine", "said"),
    [
        ("doubao-badkey", "HTTP 401 45000010: load grant: requested grant not found in SaaS storage"),
        ("doubao-quota", "error 45000292: quota exceeded for types: concurrency"),
        ("doubao-badaudio", "error 45000151: 音频格式不正确"),
        ("doubao-garbage", "not the sauc protocol"),
    ],
)
async def test_the_failure_quotes_the_vendors_answer(pipeline, doubao_server, engine, said):
    _, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model=engine)
    (failure,) = log_records(pipeline.log("asr"), "ASR engine failed", session)
    assert said in failure["error"], failure
    assert "doubao-revoked-token" not in failure["error"] and "doubao-test-token" not in failure["error"]


async def test_the_stream_sends_while_audio_comes_and_hands_partials_over(doubao_server):
    """open_stream/send/finish directly (no pipeline): partial text comes back to ``on_partial``
    before ``finish`` sends the last packet."""
    cfg = DoubaoAsrEngineSettings(**{k: v for k, v in standin.ENGINES["doubao"].items() if k != "type"})
    engine = DoubaoAsrEngine("doubao", cfg, None)  # type: ignore[arg-type]
    pcm = read_wav(fixture_wav("en_what_time.wav"))
    partials: list[str] = []

    async def on_partial(text: str) -> None:
        partials.append(text)

    mark = len(doubao_server)
    stream = await engine.open_stream(AsrRequest(), on_partial)
    step = 3200
    for start in range(0, len(pcm), step):
        await stream.send(pcm[start : start + step])
        await asyncio.sleep(0.2)  # as a device speaks
    for _ in range(300):  # the stand-in's Whisper may take a while on a busy machine
        if partials:
            break
        await asyncio.sleep(0.1)
    before_finish = list(partials)
    transcript = await asyncio.wait_for(stream.finish(), 30)
    assert transcript.text == "What time is it?"
    assert before_finish, "no partial text came back while the audio was sent"
    assert before_finish == doubao_server[mark]["partials"][: len(before_finish)]


async def test_a_cancelled_stream_closes_without_a_final(doubao_server):
    cfg = DoubaoAsrEngineSettings(**{k: v for k, v in standin.ENGINES["doubao"].items() if k != "type"})
    engine = DoubaoAsrEngine("doubao", cfg, None)  # type: ignore[arg-type]
    mark = len(doubao_server)
    stream = await engine.open_stream(AsrRequest())
    await stream.send(read_wav(fixture_wav("en_what_time.wav"))[:3200])
    await stream.cancel()
    with pytest.raises((EngineError, asyncio.CancelledError)):
        await stream.finish()
    for _ in range(50):
        if doubao_server[mark].get("error"):
            break
        await asyncio.sleep(0.1)
    assert doubao_server[mark]["final"] is None and doubao_server[mark]["error"] == 45000081
