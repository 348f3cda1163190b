"""Scaling efficiency: turns per second with 1 and 2 replicas of the bottleneck stage.

For each configuration it starts a whole stack of its own (nats-server, every service, the
default local models) with the given number of LLM worker processes and llama.cpp threads per
process, warms it with one turn, then runs the same closed-loop load as ``xiaozhi bench``:
D devices, each speaking fixture WAVs in real time, waiting for and playing out the reply,
thinking briefly and speaking again. Temperature 0, so the model says the same things in every
configuration. It reports turns per second, voice-to-voice latency, how many turns waited for
the model (``xz_queue_depth`` of the LLM work queue and inside the workers, sampled) and the CPU each stage used.

    .venv/bin/python bench/scaling.py --devices 8 --turns 3 \\
        --config llm=1,threads=2 --config llm=2,threads=1 --config llm=2,threads=2 --json scaling.json

On one machine the replicas share its cores: read the result as "what a second process buys
on these cores", not as what a second node would give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xiaozhi import prom  # noqa: E402
from xiaozhi.bench import Bench, BenchConfig, percentile  # noqa: E402
from xiaozhi.sim import SimDevice, read_wav  # noqa: E402
from xiaozhi.stack import SERVICES, Stack, free_port  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"


def parse_config(text: str) -> dict[str, int]:
    config = {"llm": 1, "threads": 2}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in config:
            raise SystemExit(f"bad --config {text!r}: keys are llm and threads")
        config[key] = int(value)
    return config


async def sample_turns_waiting(ports: list[int], samples: list[int]) -> None:
    """Turns waiting: in the LLM work queue (shared, reported by every worker: take the
    largest) plus inside the workers for the model."""
    while True:
        shared_queue, in_workers = 0, 0
        for port in ports:
            try:
                scraped = await asyncio.to_thread(prom.scrape, port)
            except Exception:  # noqa: BLE001 - a scrape during shutdown
                continue
            shared_queue = max(shared_queue, int(prom.value(scraped, "xz_queue_depth", queue="llm")))
            in_workers += int(prom.value(scraped, "xz_queue_depth", queue="model"))
        samples.append(shared_queue + in_workers)
        await asyncio.sleep(0.5)


async def run_config(config: dict[str, int], args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="xz-scaling-"))
    env = {
        "XZ_LOG_LEVEL": "WARNING",
        "XZ_GATEWAY__HOST": "127.0.0.1",
        # Every simulated device comes from this one address: no per-address limits.
        "XZ_GATEWAY__RATE_LIMITS__CONNECTIONS_PER_MINUTE_PER_IP": "0",
        "XZ_GATEWAY__RATE_LIMITS__TURNS_PER_MINUTE_PER_IP": "0",
        "XZ_LLM__TEMPERATURE": "0",
        "XZ_LLM__THREADS": str(config["threads"]),
        "XZ_GATEWAY__BINDING_DB": str(tmp / "bindings.sqlite"),
    }
    stack = Stack(env=env, log_dir=tmp / "logs")
    try:
        stack.start_nats(free_port(), "127.0.0.1", str(tmp / "js"))
        ws_port = free_port()
        gateway_env = {"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(free_port())}
        procs = []
        for name in SERVICES:
            for _ in range(config["llm"] if name == "llm" else 1):
                procs.append(stack.start_service(name, free_port(), gateway_env if name == "gateway" else None))
        stack.wait_healthy(procs, timeout=300)
        url = f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/"
        # Warm-up: one turn, so no configuration pays for first-use costs in the measurement.
        async with SimDevice(ws_url=url) as device:
            await device.speak(read_wav(args.wavs[0]), reply_timeout=120)
        llm_ports = [p.metrics_port for p in procs if p.name == "llm"]
        queue_samples: list[int] = []
        sampler = asyncio.create_task(sample_turns_waiting(llm_ports, queue_samples))
        before = [prom.scrape(port) for port in llm_ports]
        bench = Bench(BenchConfig(ota_url=None, ws_url=url, devices=args.devices, ramp_up_s=args.ramp_up, turns=args.turns, wavs=args.wavs, think_s=args.think, reply_timeout_s=120))
        started = time.monotonic()
        result = await bench.run()
        elapsed = time.monotonic() - started
        sampler.cancel()
        after = [prom.scrape(port) for port in llm_ports]
        llm_turns = [prom.value(prom.delta(a, b), "xz_llm_turns_total") for a, b in zip(after, before)]
        first_sentence = prom.buckets(prom.merge([prom.delta(a, b) for a, b in zip(after, before)]), "xz_llm_first_sentence_seconds")
        ok = result["turns"]["ok"]
        return {
            "config": config,
            "devices": args.devices,
            "turns_ok": ok,
            "turns_failed": result["turns"]["failed"],
            "elapsed_s": round(elapsed, 1),
            "turns_per_s": round(ok / elapsed, 3),
            "voice_to_voice_s": result["voice_to_voice_s"],
            "llm_first_sentence_s": {
                "p50": prom.histogram_quantile(0.5, first_sentence),
                "p95": prom.histogram_quantile(0.95, first_sentence),
            },
            "turns_per_llm_process": llm_turns,
            "model_queue": {"mean": round(sum(queue_samples) / max(1, len(queue_samples)), 2), "max": max(queue_samples, default=0), "p95": percentile([float(v) for v in queue_samples], 95)},
            "server_processes": result["server_processes"],
        }
    finally:
        stack.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--think", type=float, default=0.5)
    parser.add_argument("--ramp-up", type=float, default=2.0)
    parser.add_argument("--wav", dest="wavs", action="append", default=[])
    parser.add_argument("--config", dest="configs", action="append", default=[], help="llm=N,threads=T (repeatable)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    args.wavs = args.wavs or [str(FIXTURES / "en_joke.wav"), str(FIXTURES / "en_what_time.wav")]
    configs = [parse_config(c) for c in (args.configs or ["llm=1,threads=2", "llm=2,threads=1"])]
    results = []
    for config in configs:
        print(f"--- {config['llm']} LLM process(es) x {config['threads']} llama.cpp threads, {args.devices} devices x {args.turns} turns", flush=True)
        r = await run_config(config, args)
        results.append(r)
        v = r["voice_to_voice_s"]
        cpu = {name: e["cpu_s"] for name, e in r["server_processes"].items()}
        print(
            f"    {r['turns_ok']} ok / {r['turns_failed']} failed in {r['elapsed_s']} s = {r['turns_per_s']} turns/s | "
            f"voice-to-voice p50 {v['p50'] and round(v['p50'] * 1000)} ms p95 {v['p95'] and round(v['p95'] * 1000)} ms | "
            f"turns per LLM process {r['turns_per_llm_process']} | model queue mean {r['model_queue']['mean']} max {r['model_queue']['max']} | CPU s {cpu}",
            flush=True,
        )
    base = results[0]["turns_per_s"]
    for r in results[1:]:
        if base:
            r["speedup_vs_first"] = round(r["turns_per_s"] / base, 2)
            print(f"    {r['config']}: {r['speedup_vs_first']}x the turns/s of {results[0]['config']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
