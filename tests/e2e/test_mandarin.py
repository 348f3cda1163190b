"""A Chinese agent is Chinese from the transcript to the voice (issue 17): zh_what_time.wav from
a zh agent -> a Chinese transcript -> the time plugin's Chinese answer -> the offline Mandarin
voice -> transcribed back by the multilingual Whisper in zh, with the date in Chinese."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest

from shared.audio import resample
from tests.conftest import device_with_agent, fixture_wav, log_records
from tts_svc.engine import zh_voice_dir
from xiaozhi.sim import SimDevice, read_wav

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (zh_voice_dir() / "fastspeech2.onnx").is_file(), reason="the Mandarin voice is built by make install (scripts/build_zh_voice.sh)"),
]

_ZH_WEEKDAYS = "一二三四五六日"


def heard_in_mandarin(pcm_24k: np.ndarray) -> str:
    """The reply as the multilingual base model hears it in Mandarin."""
    from asr_svc.engine import WhisperEngine

    engine = WhisperEngine("base", language="zh")
    pcm16 = resample(pcm_24k, 24000, 16000)
    return engine.transcribe(pcm16.astype(np.float32) / 32768.0).text


async def test_a_chinese_agent_answers_the_time_in_mandarin(pipeline):
    device_id = await device_with_agent(pipeline, language="zh", asr_model="base")
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        report = await device.speak(read_wav(fixture_wav("zh_what_time.wav")), reply_timeout=90)
        assert report.error is None and report.stopped, report
        pcm = device.reply_audio()
        session = device.session_id
    # The small base model may mishear one syllable (起点 for 几点): compare characters.
    assert sum(1 for char in "现在几点了" if char in (report.stt or "")) >= 4, report.stt
    now = dt.datetime.now().astimezone()
    said = " ".join(report.sentences)
    # The answer the device shows is the Chinese one, with no English template in it.
    assert f"星期{_ZH_WEEKDAYS[now.weekday()]}" in said and f"{now.month}月" in said, said
    assert not re.search(r"[A-Za-z]{2,}", said), said
    # Spoken by the Mandarin engine, not the English default.
    engines = [r["engine"] for r in log_records(pipeline.log("tts"), "sentence", session)]
    assert engines and set(engines) == {"zh"}, engines
    assert len(pcm) >= 24000, len(pcm)
    heard = heard_in_mandarin(pcm)
    # The weekday, the month and the day, as the ASR writes them (digits or hanzi).
    assert "星期" in heard, heard
    month_ok = f"{now.month}月" in heard or f"{_hanzi(now.month)}月" in heard
    day_ok = f"{now.day}日" in heard or f"{_hanzi(now.day)}日" in heard or f"{now.day}号" in heard
    assert month_ok and day_ok, (heard, said)


def _hanzi(number: int) -> str:
    digits = "零一二三四五六七八九"
    if number < 10:
        return digits[number]
    tens, ones = divmod(number, 10)
    return ("" if tens == 1 else digits[tens]) + "十" + (digits[ones] if ones else "")


async def test_mandarin_to_an_agent_of_no_fixed_language_is_answered_in_mandarin(pipeline):
    """The multilingual model hears Mandarin from an agent with no language: the answer is
    Chinese and spoken by the Mandarin voice."""
    device_id = await device_with_agent(pipeline, asr_model="base", language="auto")
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        report = await device.speak(read_wav(fixture_wav("zh_what_time.wav")), reply_timeout=90)
        assert report.error is None and report.stopped, report
        session = device.session_id
    said = " ".join(report.sentences)
    assert "星期" in said and not re.search(r"[A-Za-z]{2,}", said), (report.stt, said)
    engines = [r["engine"] for r in log_records(pipeline.log("tts"), "sentence", session)]
    assert engines and set(engines) == {"zh"}, engines
