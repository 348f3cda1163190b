"""The built-in Whisper on a GPU (``device: cuda``) and its batches: run with ``pytest
tests/gpu`` on a GPU node. Skipped where CTranslate2 sees no CUDA device (CI and laptops)."""

from __future__ import annotations

import time

import pytest

from asr_svc.engine import WhisperEngine, cuda_devices
from shared.audio import int16_to_float
from tests.conftest import fixture_wav
from xiaozhi.sim import read_wav

if cuda_devices() == 0:
    pytest.skip("no CUDA device for CTranslate2", allow_module_level=True)


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def test_whisper_on_the_gpu_hears_the_fixtures_and_batches_them() -> None:
    engine = WhisperEngine("base", "en", device="cuda")
    assert engine.device == "cuda"
    names = ["en_what_time.wav", "en_joke.wav", "en_goodbye.wav", "en_volume_80.wav"] * 2
    audios = [int16_to_float(read_wav(fixture_wav(n))) for n in names]
    engine.transcribe(audios[0])  # warm up
    started = time.perf_counter()
    alone = [words(engine.transcribe(a).text) for a in audios]
    one_by_one = time.perf_counter() - started
    started = time.perf_counter()
    together = [words(t.text) for t in engine.transcribe_batch(audios)]
    batched = time.perf_counter() - started
    assert together == alone
    print(f"\n{len(audios)} utterances on the GPU: one by one {one_by_one:.3f} s, one batch {batched:.3f} s")
