"""Time from a sentence's text to its first Opus frame, and the real-time factor, per TTS engine
(the built-in ones: Piper with the packaged English voice, the offline Mandarin voice).

    .venv/bin/python bench/tts_engines.py --runs 5

Each engine renders the same kind of sentence in its language through the TTS worker's own
render path (engine, resampling to the device's 24 kHz, 60 ms Opus frames), one sentence at a
time on this process's threads. Median and p90 over the runs, after one warm-up sentence.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.settings import Settings  # noqa: E402
from tts_svc.service import TtsWorker  # noqa: E402

SENTENCES = {
    "piper": ["It is 3:05 PM on Wednesday, December 2, 2026.", "Tomorrow in Berlin: light rain, from 1 to 8 degrees.", "Okay, from now on I am your pirate captain."],
    "zh": ["现在是2026年12月2日，星期三，下午3点零5分。", "北京明天小雨，1度到8度。", "好的，从现在起我就是你的海盗船长。"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    worker = TtsWorker(Settings())
    print(f"{'engine':8} {'first frame p50':>16} {'p90':>8} {'RTF p50':>8}  (ms; {args.runs} runs x {len(SENTENCES['piper'])} sentences)")
    for name, sentences in SENTENCES.items():
        list(worker._render(sentences[0], None, 24000, 60, name))  # warm-up (loads the engine)
        firsts, rtfs = [], []
        for _ in range(args.runs):
            for text in sentences:
                started = time.perf_counter()
                frames = 0
                for _frame in worker._render(text, None, 24000, 60, name):
                    if frames == 0:
                        firsts.append((time.perf_counter() - started) * 1000)
                    frames += 1
                rtfs.append((time.perf_counter() - started) / (frames * 0.06))
        firsts.sort()
        print(f"{name:8} {statistics.median(firsts):16.0f} {firsts[int(len(firsts) * 0.9)]:8.0f} {statistics.median(rtfs):8.3f}")


if __name__ == "__main__":
    main()
