"""Several utterances through Whisper in one pass (the GPU path, checked here on the CPU:
CTranslate2 batches the same way on both): the same words as one at a time."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from asr_svc.engine import WhisperEngine
from asr_svc.providers import AsrRequest, WhisperAdapter
from shared.audio import int16_to_float
from tests.conftest import fixture_wav
from xiaozhi.sim import read_wav


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


@pytest.fixture(scope="module")
def base() -> WhisperEngine:
    return WhisperEngine("base", "en", threads=1)


def test_a_batch_hears_what_single_calls_hear(base: WhisperEngine) -> None:
    names = ["en_what_time.wav", "en_joke.wav", "en_goodbye.wav", "en_volume_80.wav"]
    audios = [int16_to_float(read_wav(fixture_wav(n))) for n in names]
    alone = [words(base.transcribe(a).text) for a in audios]
    together = [words(t.text) for t in base.transcribe_batch(audios)]
    assert together == alone, (together, alone)


def test_a_mixed_batch_keeps_each_language(base: WhisperEngine) -> None:
    zh = int16_to_float(read_wav(fixture_wav("zh_what_time.wav")))
    en = int16_to_float(read_wav(fixture_wav("en_what_time.wav")))
    out = base.transcribe_batch([zh, en, zh], ["zh", "en", "zh"])
    assert [t.language for t in out] == ["zh", "en", "zh"]
    assert words(out[1].text) == ["what", "time", "is", "it"]
    for t in (out[0], out[2]):
        assert sum(1 for c in "现在几点了" if c in t.text) >= 4, t.text


async def test_utterances_waiting_together_share_one_pass(base: WhisperEngine) -> None:
    with ThreadPoolExecutor(1) as pool:
        adapter = WhisperAdapter("base", base, pool, timeout_s=60, batch_size=8)
        pcm = [read_wav(fixture_wav(n)) for n in ("en_what_time.wav", "en_goodbye.wav", "en_joke.wav")]
        results = await asyncio.gather(*(adapter.transcribe(p, AsrRequest()) for p in pcm))
        assert adapter.batches == 1
        assert [words(r.text)[:2] for r in results] == [["what", "time"], ["goodbye", "see"], ["tell", "me"]]


async def test_hotwords_reach_whisper_and_leave_the_words_alone(base: WhisperEngine) -> None:
    """The agent's hotwords go in (faster-whisper's ``hotwords``); a question without them is
    still heard as it was said."""
    with ThreadPoolExecutor(1) as pool:
        adapter = WhisperAdapter("base", base, pool, timeout_s=60, batch_size=8)
        result = await adapter.transcribe(read_wav(fixture_wav("en_what_time.wav")), AsrRequest(hotwords=["Xiaozhi", "Erin"]))
        assert words(result.text) == ["what", "time", "is", "it"]
        assert adapter.batches == 0  # an utterance with hotwords goes alone
