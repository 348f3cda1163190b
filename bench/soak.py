"""Soak: simulated devices talk for a long time; memory must stay flat, nothing may leak.

Starts its own stack (nats-server with monitoring, every service, the default models). D
firmware-faithful devices loop for ``--minutes``: connect, speak a fixture WAV or type text a few
times (real time, replies played out), disconnect, think, reconnect — so sessions churn as well
as turns. Every ``--sample`` seconds it records each service's RSS, the gateway's asyncio task
count and sessions, VAD sessions, and nats-server's subscription and connection counts. At the
end it fits a line to each service's RSS after the warm-up and reports the growth per 10
minutes, with the turn outcomes and latency per window.

    .venv/bin/python bench/soak.py --minutes 30 --devices 4 --json soak.json

Not part of the test suite (it takes as long as you ask).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xiaozhi.bench import percentile  # noqa: E402
from xiaozhi.procstat import rss_mb  # noqa: E402
from xiaozhi.sim import SimDevice, read_wav  # noqa: E402
from xiaozhi.stack import SERVICES, Stack, free_port  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"


def get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return json.loads(response.read())
    except Exception:  # noqa: BLE001 - a sample during a hiccup is recorded as missing
        return {}


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / var * 600


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.turns: list[dict] = []
        self.samples: list[dict] = []
        self.sessions_opened = 0
        self.stop_at = 0.0
        self.audio = {name: read_wav(FIXTURES / name) for name in ("en_what_time.wav", "en_joke.wav")}

    async def device(self, index: int, url: str) -> None:
        rng = random.Random(index)
        await asyncio.sleep(index * 1.5)
        while time.monotonic() < self.stop_at:
            try:
                async with SimDevice(ws_url=url) as device:
                    self.sessions_opened += 1
                    for _ in range(rng.randint(1, 4)):
                        if time.monotonic() >= self.stop_at:
                            break
                        started = time.monotonic()
                        if rng.random() < 0.5:
                            report = await device.speak(self.audio[rng.choice(list(self.audio))], reply_timeout=60)
                        else:
                            report = await device.type_text(rng.choice(["What time is it?", "Tell me a short joke.", "What day is it today?"]), reply_timeout=60)
                        ok = report.error is None and report.stopped and report.frames > 0
                        self.turns.append({"at": started, "ok": ok, "latency_s": report.latency_s, "error": report.error})
                        # The device sends its own `listen start` once the reply has played.
                        await asyncio.sleep(rng.uniform(0.5, 2.0))
            except Exception as exc:  # noqa: BLE001 - a failed session is a result
                self.turns.append({"at": time.monotonic(), "ok": False, "latency_s": None, "error": f"session: {type(exc).__name__}"})
            await asyncio.sleep(rng.uniform(1, 4))

    async def sampler(self, pids: dict[str, list[int]], ports: dict[str, int], monitor: int, t0: float, once: bool = False) -> None:
        while once or time.monotonic() < self.stop_at + 5:
            varz = get_json(f"http://127.0.0.1:{monitor}/varz")
            gw = get_json(f"http://127.0.0.1:{ports['gateway']}/healthz")
            vad = get_json(f"http://127.0.0.1:{ports['vad']}/healthz")
            self.samples.append({
                "t": round(time.monotonic() - t0, 1),
                "rss_mb": {name: round(sum(rss_mb(p) for p in group), 1) for name, group in pids.items()},
                "gateway_tasks": gw.get("tasks"),
                "gateway_sessions": gw.get("sessions"),
                "vad_sessions": vad.get("sessions"),
                "nats_subscriptions": varz.get("subscriptions"),
                "nats_connections": varz.get("connections"),
            })
            if once:
                return
            await asyncio.sleep(self.args.sample)

    async def run(self) -> dict:
        tmp = Path(tempfile.mkdtemp(prefix="xz-soak-"))
        stack = Stack(env={"XZ_LOG_LEVEL": "WARNING", "XZ_GATEWAY__HOST": "127.0.0.1", "XZ_GATEWAY__RATE_LIMITS__CONNECTIONS_PER_MINUTE_PER_IP": "0", "XZ_GATEWAY__RATE_LIMITS__TURNS_PER_MINUTE_PER_IP": "0", "XZ_GATEWAY__BINDING_DB": str(tmp / "b.sqlite")}, log_dir=tmp / "logs")
        monitor = free_port()
        try:
            stack.start_nats(free_port(), "127.0.0.1", str(tmp / "js"), monitor_port=monitor)
            ws_port = free_port()
            gateway_env = {"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(free_port())}
            procs = [stack.start_service(name, free_port(), gateway_env if name == "gateway" else None) for name in SERVICES]
            stack.wait_healthy(procs, timeout=300)
            pids: dict[str, list[int]] = {}
            for proc in stack.procs:
                pids.setdefault(proc.name, []).append(proc.popen.pid)
            ports = {p.name: p.metrics_port for p in procs if p.metrics_port}
            url = f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/"
            t0 = time.monotonic()
            self.stop_at = t0 + self.args.minutes * 60
            progress = asyncio.create_task(self.progress(t0))
            await asyncio.gather(self.sampler(pids, ports, monitor, t0), *(self.device(i, url) for i in range(self.args.devices)))
            progress.cancel()
            await asyncio.sleep(5)
            # One more sample once every device has left: sessions and tasks back to idle?
            self.stop_at = time.monotonic() - 5
            await self.sampler(pids, ports, monitor, t0, once=True)
            self.samples[-1]["note"] = "after every device left"
            return self.report(pids)
        finally:
            stack.stop()

    async def progress(self, t0: float) -> None:
        while True:
            await asyncio.sleep(30)
            ok = sum(1 for t in self.turns if t["ok"])
            last = self.samples[-1] if self.samples else {}
            print(f"[{(time.monotonic() - t0) / 60:5.1f} min] turns {ok} ok / {len(self.turns) - ok} failed, sessions opened {self.sessions_opened}, "
                  f"RSS {last.get('rss_mb')}, gateway tasks {last.get('gateway_tasks')}, nats subs {last.get('nats_subscriptions')}", flush=True)

    def report(self, pids: dict[str, list[int]]) -> dict:
        warm = self.args.warmup * 60
        steady = [s for s in self.samples if s.get("t", 0) >= warm and "note" not in s]
        growth = {name: slope_per_10min([(s["t"], s["rss_mb"][name]) for s in steady]) for name in pids}
        windows = []
        if self.turns:
            start = min(t["at"] for t in self.turns)
            for w in range(int(self.args.minutes // 5) + 1):
                chunk = [t for t in self.turns if start + w * 300 <= t["at"] < start + (w + 1) * 300]
                lat = [t["latency_s"] for t in chunk if t["ok"] and t["latency_s"] is not None]
                if chunk:
                    windows.append({"minutes": f"{w * 5}-{(w + 1) * 5}", "turns": len(chunk), "failed": sum(1 for t in chunk if not t["ok"]),
                                    "voice_p50_ms": round(percentile(lat, 50) * 1000) if lat else None, "voice_p95_ms": round(percentile(lat, 95) * 1000) if lat else None})
        errors: dict[str, int] = {}
        for t in self.turns:
            if not t["ok"]:
                errors[str(t["error"])] = errors.get(str(t["error"]), 0) + 1
        return {
            "minutes": self.args.minutes,
            "devices": self.args.devices,
            "sessions_opened": self.sessions_opened,
            "turns": {"total": len(self.turns), "ok": sum(1 for t in self.turns if t["ok"]), "errors": errors},
            "rss_growth_mb_per_10min_after_warmup": {k: (round(v, 2) if v is not None else None) for k, v in growth.items()},
            "first_steady_sample": steady[0] if steady else None,
            "last_sample": self.samples[-1] if self.samples else None,
            "windows": windows,
            "samples": self.samples,
        }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--sample", type=float, default=30, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=5, help="minutes left out of the growth fit")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    result = await Soak(args).run()
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
