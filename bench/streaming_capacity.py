"""Streaming capacity: K devices stream microphone silence in real time through gateway and VAD.

Starts its own nats-server, one VAD worker and one gateway (no ASR/LLM/TTS: silence never
becomes an utterance). K firmware-faithful simulated devices connect, say hello, send
``listen start`` (auto) and then stream 60 ms Opus frames of quiet microphone noise in real
time, spread evenly over each 60 ms period as independent devices would be. Over a measuring
window it reports:

- frame-forwarding latency: gateway receipt of a frame to the VAD having scored it
  (``xz_vad_frame_lag_seconds``, one frame in 8; quantiles interpolated inside its buckets);
- frames the gateway and the VAD handled against the frames sent, and anything dropped;
- CPU of each stage (gateway, VAD, nats-server) and per streaming session;
- how late the load generator itself sent frames (if it falls behind, the figures are not
  the server's).

    .venv/bin/python bench/streaming_capacity.py --devices 25 50 100 --seconds 20 --json streaming.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.audio import OpusEncoder  # noqa: E402
from xiaozhi import prom  # noqa: E402
from xiaozhi.bench import percentile  # noqa: E402
from xiaozhi.procstat import cpu_seconds, rss_mb  # noqa: E402
from xiaozhi.sim import UPLINK_RATE, SimDevice, wrap_audio  # noqa: E402
from xiaozhi.stack import Stack, free_port  # noqa: E402

FRAME_MS = 60


def quiet_frames(n: int = 50, level_dbfs: float = -60.0) -> list[bytes]:
    """Opus frames of a quiet room (low noise), as a device's microphone sends between words."""
    rng = np.random.default_rng(7)
    samples = UPLINK_RATE * FRAME_MS // 1000
    amplitude = 32768 * 10 ** (level_dbfs / 20)
    encoder = OpusEncoder(UPLINK_RATE, FRAME_MS, complexity=0)
    return [encoder.encode((rng.standard_normal(samples) * amplitude).astype(np.int16)) for _ in range(n)]


class Streamer:
    """Sends one frame per device every 60 ms, devices evenly staggered inside the period."""

    def __init__(self, devices: list[SimDevice], frames: list[bytes]) -> None:
        self.devices = devices
        self.frames = [wrap_audio(f, 1) for f in frames]
        self.sent = 0
        self.lateness: list[float] = []
        self._stop = False

    async def run(self) -> None:
        period = FRAME_MS / 1000
        n = len(self.devices)
        start = time.monotonic() + 0.1
        k = 0
        while not self._stop:
            for i, device in enumerate(self.devices):
                target = start + k * period + period * i / n
                delay = target - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.lateness.append(-delay)
                if device.closed:
                    continue
                try:
                    await device.ws.send(self.frames[(k + i) % len(self.frames)])
                    self.sent += 1
                except Exception:  # noqa: BLE001 - a closed socket shows up in `held`
                    device.closed = True
            k += 1
            if len(self.lateness) > 200000:
                self.lateness = self.lateness[-100000:]

    def stop(self) -> None:
        self._stop = True


async def connect_all(url: str, n: int, batch: int = 50) -> list[SimDevice]:
    devices: list[SimDevice] = []
    for start in range(0, n, batch):
        group = [SimDevice(ws_url=url) for _ in range(min(batch, n - start))]
        await asyncio.gather(*(d.connect() for d in group))
        await asyncio.gather(*(d.listen_start("auto") for d in group))
        devices += group
    return devices


async def measure(url: str, pids: dict[str, int], ports: dict[str, int], n: int, seconds: float, frames: list[bytes]) -> dict:
    devices = await connect_all(url, n)
    streamer = Streamer(devices, frames)
    task = asyncio.create_task(streamer.run())
    await asyncio.sleep(3)  # warm-up: claims settled, every stream running
    streamer.lateness.clear()
    sent0 = streamer.sent
    scrape0 = {name: prom.scrape(port) for name, port in ports.items()}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own0 = time.process_time()
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - t0
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own1 = time.process_time()
    scrape1 = {name: prom.scrape(port) for name, port in ports.items()}
    sent = streamer.sent - sent0
    lateness = list(streamer.lateness)
    streamer.stop()
    await task
    held = sum(1 for d in devices if not d.closed)
    rss = {name: round(rss_mb(pid), 1) for name, pid in pids.items()}
    await asyncio.gather(*(d.close() for d in devices))
    await asyncio.sleep(2)

    gw = prom.delta(scrape1["gateway"], scrape0["gateway"])
    vad = prom.delta(scrape1["vad"], scrape0["vad"])
    lag = prom.buckets(vad, "xz_vad_frame_lag_seconds")
    proc = prom.buckets(vad, "xz_vad_frame_processing_seconds")
    dropped = {
        name: {dict(labels)["reason"]: v for (sample, labels), v in window.items() if sample == "xz_dropped_total" and v}
        for name, window in (("gateway", gw), ("vad", vad))
    }
    cpu = {name: (cpu1[name] - cpu0[name]) / elapsed for name in pids}
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "devices": n,
        "held": held,
        "seconds": round(elapsed, 1),
        "frames": {
            "sent": sent,
            "expected": int(n * elapsed * 1000 / FRAME_MS),
            "gateway_in": int(prom.value(gw, "xz_gateway_audio_frames_in_total")),
            "vad_scored": int(prom.value(vad, "xz_vad_frames_total")),
            "dropped": dropped,
            "utterances_cut": int(prom.value(vad, "xz_vad_utterances_total")),
        },
        "frame_lag_ms": {
            "sampled_frames": int(lag[-1][1]) if lag else 0,
            "p50": ms(prom.histogram_quantile(0.5, lag)),
            "p95": ms(prom.histogram_quantile(0.95, lag)),
            "p99": ms(prom.histogram_quantile(0.99, lag)),
        },
        "vad_frame_processing_ms": {
            "p50": ms(prom.histogram_quantile(0.5, proc)),
            "p99": ms(prom.histogram_quantile(0.99, proc)),
        },
        "cpu_percent": {name: round(100 * v, 1) for name, v in cpu.items()},
        "cpu_percent_per_session": {name: round(100 * v / n, 3) for name, v in cpu.items()},
        "rss_mb": rss,
        "load_generator": {
            "cpu_percent": round(100 * (own1 - own0) / elapsed, 1),
            "send_late_p50_ms": ms(percentile(lateness, 50)) or 0.0,
            "send_late_p99_ms": ms(percentile(lateness, 99)) or 0.0,
        },
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per step")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xz-stream-"))
    stack = Stack(env={"XZ_LOG_LEVEL": "WARNING", "XZ_GATEWAY__HOST": "127.0.0.1", "XZ_GATEWAY__RATE_LIMITS__CONNECTIONS_PER_MINUTE_PER_IP": "0", "XZ_GATEWAY__RATE_LIMITS__TURNS_PER_MINUTE_PER_IP": "0"}, log_dir=tmp / "logs")
    frames = quiet_frames()
    try:
        stack.start_nats(free_port(), "127.0.0.1", str(tmp / "js"))
        ws_port = free_port()
        vad = stack.start_service("vad", free_port())
        gateway = stack.start_service("gateway", free_port(), {"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(free_port())})
        stack.wait_healthy([vad, gateway])
        url = f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/"
        nats_proc = next(p for p in stack.procs if p.name == "nats")
        pids = {"gateway": gateway.popen.pid, "vad": vad.popen.pid, "nats": nats_proc.popen.pid}
        ports = {"gateway": gateway.metrics_port, "vad": vad.metrics_port}
        results = []
        for n in args.devices:
            r = await measure(url, pids, ports, n, args.seconds, frames)
            results.append(r)
            f, lag, cpu, per = r["frames"], r["frame_lag_ms"], r["cpu_percent"], r["cpu_percent_per_session"]
            print(
                f"{n:>5} streams ({r['held']} held): frames sent {f['sent']} / gateway {f['gateway_in']} / vad {f['vad_scored']}, "
                f"dropped {f['dropped']} | lag p50 {lag['p50']} p95 {lag['p95']} p99 {lag['p99']} ms | "
                f"CPU gateway {cpu['gateway']}% vad {cpu['vad']}% nats {cpu['nats']}% "
                f"(per stream {per['gateway']}/{per['vad']}/{per['nats']}%) | "
                f"load generator {r['load_generator']['cpu_percent']}% CPU, sends late p99 {r['load_generator']['send_late_p99_ms']} ms"
            )
            sys.stdout.flush()
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(results, indent=2))
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
