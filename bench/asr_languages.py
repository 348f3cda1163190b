"""Whisper time per utterance by model, language and beam, on the packaged models.

    .venv/bin/python bench/asr_languages.py --runs 5

What an agent's choice of speech model and language costs the ASR stage: tiny.en on English,
base on English and on Mandarin (beam 1 and 5; Mandarin uses asr.beam_size_zh, 5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr_svc.engine import WhisperEngine  # noqa: E402
from shared.audio import int16_to_float  # noqa: E402
from xiaozhi.sim import read_wav  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
CASES = [
    ("tiny.en", "en", 1, "en_what_time.wav"),
    ("base", "en", 1, "en_what_time.wav"),
    ("base", "zh", 1, "zh_what_time.wav"),
    ("base", "zh", 5, "zh_what_time.wav"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("| model | language | beam | speech | median | text |\n|---|---|---|---|---|---|")
    for model, language, beam, wav in CASES:
        engine = WhisperEngine(model, language, beam_size=beam, threads=args.threads, beam_size_zh=beam)
        audio = int16_to_float(read_wav(FIXTURES / wav))
        engine.transcribe(audio)  # warm-up
        times, text = [], ""
        for _ in range(args.runs):
            started = time.perf_counter()
            text = engine.transcribe(audio).text
            times.append(time.perf_counter() - started)
        print(f"| {model} | {language} | {beam} | {len(audio) / 16000:.1f} s | {statistics.median(times):.2f} s | {text} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
