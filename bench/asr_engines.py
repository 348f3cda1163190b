"""Time from the end of turn to the final text, per ASR engine type, and the CPU our process
spends per utterance.

    .venv/bin/python bench/asr_engines.py --runs 5

Each remote engine talks to its stand-in (tests/standins: the vendor's protocol, transcribing
with the packaged Whisper), served from a thread of this process on 127.0.0.1. The stand-ins add
no delay of their own, but their Whisper is the vendor's work: the table shows the final
text's transcription apart ("vendor"; a streaming stand-in still transcribing a partial when
the end comes makes that one slower, which stays in "vendor"), and "ours" is what is left, the
engine's and the protocol's share. A streaming
engine is fed the utterance in real time, 200 ms at a time, as the VAD streams it while the
user speaks, then the 700 ms of silence the VAD waits for (``vad.min_silence_ms``); the clock
starts at that end of turn. Whole-utterance engines get the utterance at once at the end of
turn. CPU: this process's event-loop thread (where the engines run) for remote engines, the
whole process for the built-in Whisper.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from asr_svc.providers import AsrRequest, EngineSet, StreamingEngine  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests import standins  # noqa: E402
from tests.standins import ThreadedServer  # noqa: E402
from tests.standins import engines as standin  # noqa: E402
from xiaozhi.sim import read_wav  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
CHUNK_S = 0.2
END_OF_TURN_SILENCE_S = 0.7


def servers() -> list[ThreadedServer]:
    out = []
    for kind in ("openai_asr", "funasr", "doubao", "aliyun"):
        try:
            module = __import__(f"tests.standins.{kind}", fromlist=["make_app"])
        except ImportError:
            continue
        port = standin.PORTS["openai" if kind == "openai_asr" else kind]
        out.append(ThreadedServer(module.make_app, port).start())
    return out


async def one(engines: EngineSet, name: str, pcm, language: str | None) -> tuple[float, float, float, str]:
    engine = await engines.get(name)
    request = AsrRequest(language=language)
    if isinstance(engine, StreamingEngine):
        pcm = np.concatenate([pcm, np.zeros(int(16000 * END_OF_TURN_SILENCE_S), dtype=np.int16)])
        stream = await engine.open_stream(request)
        step = int(16000 * CHUNK_S)
        started_wall = time.monotonic()
        for k, start in enumerate(range(0, len(pcm), step)):
            await stream.send(pcm[start : start + step])
            # Real time: the next chunk is spoken CHUNK_S later.
            await asyncio.sleep(max(0.0, started_wall + (k + 1) * CHUNK_S - time.monotonic()))
        vendor0, cpu0, t0 = standins.WHISPER_SECONDS[0], time.thread_time(), time.perf_counter()
        transcript = await stream.finish()
    else:
        vendor0, cpu0, t0 = standins.WHISPER_SECONDS[0], (time.process_time() if engine.type == "whisper" else time.thread_time()), time.perf_counter()
        transcript = await engine.transcribe(pcm, request)
    elapsed = time.perf_counter() - t0
    cpu = (time.process_time() if engine.type == "whisper" else time.thread_time()) - cpu0
    # The final text's own transcription: the last Whisper call, when one ran since the clock
    # started (partials before it belong to the speaking time).
    vendor = standins.LAST_WHISPER_S[0] if standins.WHISPER_SECONDS[0] > vendor0 else 0.0
    return elapsed, vendor, cpu, transcript.text


async def run(args: argparse.Namespace) -> None:
    settings = Settings(asr={"engines": standin.ENGINES})
    cases = [(name, args.wav) for name in args.engines]
    up = servers()
    try:
        with ThreadPoolExecutor(1) as pool:
            engines = EngineSet(settings.asr, pool)
            pcm = read_wav(FIXTURES / args.wav)
            print(f"{args.wav}, {len(pcm) / 16000:.2f} s of speech, {args.runs} runs (median):\n")
            print("| engine | type | end of turn → final text | vendor (stand-in Whisper) | ours | CPU in our process | text |")
            print("|---|---|---|---|---|---|---|")
            for name, _ in cases:
                await one(engines, name, pcm, args.language)  # warm: connection, models
                rows = [await one(engines, name, pcm, args.language) for _ in range(args.runs)]
                total = statistics.median(r[0] for r in rows)
                vendor = statistics.median(r[1] for r in rows)
                ours = statistics.median(r[0] - r[1] for r in rows)
                cpu = statistics.median(r[2] for r in rows)
                kind = engines.configs[name].type
                print(f"| {name} | {kind} | {total * 1000:.0f} ms | {vendor * 1000:.0f} ms | {ours * 1000:.0f} ms | {cpu * 1000:.1f} ms | {rows[-1][3]} |")
            await engines.close()
    finally:
        for server in up:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--wav", default="en_what_time.wav")
    parser.add_argument("--language", default=None)
    parser.add_argument("--engines", nargs="+", default=["tiny.en", "openai", "funasr", "funasr-2pass", "doubao", "aliyun"])
    args = parser.parse_args()
    args.engines = [e for e in args.engines if e in Settings(asr={"engines": standin.ENGINES}).asr.engine_settings()]
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
