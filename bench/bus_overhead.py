"""Bus overhead: the same turn through NATS and through the same engines called in one process.

A turn here is a recorded utterance (Opus frames) -> ASR -> LLM (first sentence) -> TTS (first
60 ms Opus frame): the voice-to-voice path after the end of speech. In-process, the engines are
called directly one after the other; over the bus, the ASR, LLM and TTS workers run as their own
processes and the utterance goes in on ``xz.asr.<S>`` and the first frame comes out on
``xz.out.<S>``. Both use temperature 0, so the model writes the same sentence. The difference is
what the bus costs per turn; a request/reply echo gives the cost per hop.

    .venv/bin/python bench/bus_overhead.py --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.aio.client import Client as NATS  # noqa: E402

from asr_svc.engine import WhisperEngine  # noqa: E402
from llm_svc.backends import LlamaCppBackend  # noqa: E402
from llm_svc.sentences import SentenceSplitter  # noqa: E402
from shared.audio import FrameCutter, OpusEncoder, Resampler, decode_packets, encode_pcm, int16_to_float  # noqa: E402
from shared.messages import AudioFrameMeta, Utterance, new_turn_id  # noqa: E402
from shared.settings import LlmSettings  # noqa: E402
from shared.subjects import Subjects  # noqa: E402
from tts_svc.engine import PiperEngine  # noqa: E402
from xiaozhi.sim import read_wav  # noqa: E402
from xiaozhi.stack import Stack, free_port  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio" / "en_joke.wav"


STAGES: dict[str, list[float]] = {"asr": [], "llm_first_sentence": [], "tts_first_frame": []}


async def in_process(packets: list[bytes], asr: WhisperEngine, llm: LlamaCppBackend, tts: PiperEngine, system: str) -> float:
    start = time.perf_counter()
    text = asr.transcribe(int16_to_float(decode_packets(packets, 16000))).text.strip()
    t_asr = time.perf_counter()
    splitter = SentenceSplitter()
    sentence = None
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    async for delta in llm.stream(messages, [], threading.Event()):
        if isinstance(delta, str):
            done = splitter.push(delta)
            if done:
                sentence = done[0]
                break
    sentence = sentence or (splitter.flush() or [""])[0]
    t_llm = time.perf_counter()
    encoder = OpusEncoder(24000, 60)
    resampler = Resampler(tts.sample_rate, 24000)
    cutter = FrameCutter(encoder.frame_samples)
    for chunk in tts.synthesize(sentence):
        frames = cutter.push(resampler.push(chunk))
        if frames:
            encoder.encode(frames[0])
            break
    end = time.perf_counter()
    STAGES["asr"].append(t_asr - start)
    STAGES["llm_first_sentence"].append(t_llm - t_asr)
    STAGES["tts_first_frame"].append(end - t_llm)
    return end - start


def scrape(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of every histogram in a service's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not (line.split(" ")[0].endswith("_sum") or line.split(" ")[0].endswith("_count")):
            continue
        name, value = line.split(" ")[0], float(line.split(" ")[-1])
        base = name.rsplit("_", 1)[0]
        entry = out.setdefault(base, [0.0, 0.0])
        entry[0 if name.endswith("_sum") else 1] += value
    return {k: (v[0], v[1]) for k, v in out.items()}


async def over_bus(nc: NATS, packets: list[bytes]) -> float:
    subjects = Subjects()
    session = "bus-" + new_turn_id()
    sub = await nc.subscribe(subjects.out(session))
    start = time.perf_counter()
    await nc.publish(subjects.asr(session), Utterance(session_id=session, turn_id=new_turn_id()).pack(packets))
    while True:
        msg = await sub.next_msg(timeout=60)
        if AudioFrameMeta.from_headers(msg.headers) is not None:
            elapsed = time.perf_counter() - start
            break
    await sub.unsubscribe()
    return elapsed


async def hop_cost(nc: NATS, size: int, runs: int = 300) -> float:
    async def echo(msg):
        await msg.respond(msg.data)

    sub = await nc.subscribe("bench.echo", cb=echo)
    payload = b"x" * size
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        await nc.request("bench.echo", payload, timeout=5)
        times.append(time.perf_counter() - t)
    await sub.unsubscribe()
    return statistics.median(times) / 2  # one way


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    packets = encode_pcm(read_wav(FIXTURE), 16000, 60)
    # The same prompt the LLM worker builds (role, time, language), without the emoji list.
    import datetime as dt

    from llm_svc.prompt import system_prompt
    from shared.agents import AgentConfig

    system = system_prompt(LlmSettings().system_prompt, AgentConfig(), dt.datetime.now().astimezone(), language="en", emoji=False)

    asr = WhisperEngine("tiny.en", "en")
    llm = LlamaCppBackend(None, temperature=0.0)
    tts = PiperEngine()
    await in_process(packets, asr, llm, tts, system)  # warm-up
    local = [await in_process(packets, asr, llm, tts, system) for _ in range(args.runs)]
    del asr, llm, tts

    tmp = Path(tempfile.mkdtemp(prefix="xz-bus-"))
    stack = Stack(env={"XZ_LOG_LEVEL": "WARNING", "XZ_LLM__TEMPERATURE": "0", "XZ_LLM__TOOLS": "false", "XZ_LLM__EMOJI_PROMPT": "false", "XZ_LLM__HISTORY_TURNS": "0"}, log_dir=tmp / "logs")
    try:
        stack.start_nats(free_port(), "127.0.0.1", str(tmp / "js"))
        procs = [stack.start_service(name, free_port()) for name in ("asr", "llm", "tts")]
        stack.wait_healthy(procs)
        ports = {p.name: p.metrics_port for p in procs}
        nc = NATS()
        await nc.connect(stack.nats_url)
        await over_bus(nc, packets)  # warm-up
        before = {name: scrape(port) for name, port in ports.items()}
        bus = [await over_bus(nc, packets) for _ in range(args.runs)]
        after = {name: scrape(port) for name, port in ports.items()}

        def mean(service: str, metric: str) -> float:
            s0, c0 = before[service].get(metric, (0.0, 0.0))
            s1, c1 = after[service].get(metric, (0.0, 0.0))
            return (s1 - s0) / max(1.0, c1 - c0)

        worker_stages = {
            "asr": mean("asr", "xz_asr_seconds"),
            "llm_first_sentence": mean("llm", "xz_llm_first_sentence_seconds"),
            "tts_first_frame": mean("tts", "xz_tts_first_frame_seconds"),
        }
        hops = {size: await hop_cost(nc, size) for size in (200, 2000, 20000)}
        await nc.close()
    finally:
        stack.stop()

    lp, bp = statistics.median(local), statistics.median(bus)
    print(f"utterance -> first reply frame, median of {args.runs}:")
    print(f"  in one process: {lp * 1000:7.1f} ms   (runs: {', '.join(f'{x * 1000:.0f}' for x in local)})")
    print(f"  over NATS:      {bp * 1000:7.1f} ms   (runs: {', '.join(f'{x * 1000:.0f}' for x in bus)})")
    print(f"  difference:     {(bp - lp) * 1000:7.1f} ms per turn")
    print("stage times (mean), in one process vs inside the workers (their own histograms):")
    for stage, value in worker_stages.items():
        print(f"  {stage:<20} {statistics.mean(STAGES[stage][1:] or STAGES[stage]) * 1000:7.1f} ms   {value * 1000:7.1f} ms")
    inside = sum(worker_stages.values())
    print(f"  bus turn minus the workers' own stage times: {(statistics.mean(bus) - inside) * 1000:.1f} ms (hops, decoding, queueing)")
    print("one-way NATS hop on loopback (half a request/reply round trip, median of 300):")
    for size, cost in hops.items():
        print(f"  {size:>6} B: {cost * 1e6:7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
