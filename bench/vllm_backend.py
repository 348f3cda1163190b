"""The in-process vLLM backend on a GPU node: time to first token and tokens/s by concurrency.

    python bench/vllm_backend.py                        # the packaged SmolLM2, converted once
    python bench/vllm_backend.py --model Qwen/Qwen2.5-1.5B-Instruct --concurrency 1 16 64

Each level runs that many spoken-style requests at once through ``VllmBackend.stream`` (what
the LLM worker does for its turns in flight) and reports time to first text, per-stream decode
rate and the engine's total output rate. Needs vLLM and a CUDA GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_svc.vllm_backend import VllmBackend  # noqa: E402

SYSTEM = "You are Xiaozhi, a friendly voice assistant. Answer in one to three short spoken sentences."
TOPICS = ["the moon", "tea", "rain", "bicycles", "the sea", "music", "bread", "winter", "cats", "trains", "maps", "clocks"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(backend: VllmBackend, n: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me something about {TOPICS[n % len(TOPICS)]} (#{n})."}]
    started = time.perf_counter()
    first = None
    text = ""
    async for delta in backend.stream(messages, [], threading.Event()):
        if first is None:
            first = time.perf_counter()
        text += str(delta)
    ended = time.perf_counter()
    tokens = len(backend._tokenizer.encode(text, add_special_tokens=False))
    return {"ttft": (first or ended) - started, "total": ended - started, "tokens": tokens}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--gpu-memory", type=float, default=0.5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    loaded = time.perf_counter()
    backend = VllmBackend(args.model, max_tokens=args.max_tokens, temperature=0.3, gpu_memory_utilization=args.gpu_memory, max_model_len=2048)
    load_s = time.perf_counter() - loaded
    await one(backend, 0)  # warm-up
    rows = []
    for level in args.concurrency:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(backend, n) for n in range(level)))
        wall = time.perf_counter() - started
        ttft = [r["ttft"] for r in results]
        rates = [r["tokens"] / max(1e-6, r["total"] - r["ttft"]) for r in results if r["tokens"] > 1]
        tokens = sum(r["tokens"] for r in results)
        rows.append({
            "concurrency": level,
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1),
            "ttft_p95_ms": round(pct(ttft, 0.95) * 1000, 1),
            "stream_tok_s_p50": round(statistics.median(rates), 1) if rates else None,
            "total_tok_s": round(tokens / wall, 1),
            "tokens": tokens,
            "wall_s": round(wall, 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    report = {"model": backend.model, "engine_load_s": round(load_s, 1), "levels": rows}
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    await backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
