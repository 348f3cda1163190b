"""``xiaozhi bench``: many simulated devices talking at once, measured as users feel it.

Each device does what the firmware does: OTA, WebSocket and hello, ``listen start``, a fixture
WAV as real-time 60 ms Opus frames, then real-time silence until the reply starts; it waits for
the reply and for its play-out, thinks a moment, and talks again. It works against any server
that speaks the protocol, so other implementations can be measured side by side with ours.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xiaozhi.procstat import cpu_seconds, rss_bytes
from xiaozhi.firmware import Jitter
from xiaozhi.sim import SimDevice, TurnReport, read_wav

SERVICE_MODULES = ("gateway", "vad_svc", "asr_svc", "llm_svc", "tts_svc", "tools_svc", "manager")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


@dataclass
class TurnRecord:
    device: int
    turn: int
    wav: str
    ok: bool
    reason: str = ""
    latency_s: float | None = None
    stt_s: float | None = None
    tts_start_s: float | None = None
    first_sentence_s: float | None = None
    first_audio_s: float | None = None
    frames: int = 0
    underruns: int = 0
    overflow_frames: int = 0
    max_gap_s: float | None = None  # longest wait between two reply frames as they arrived
    dropped_frames: int = 0  # frames the firmware would not have played (xiaozhi/firmware.py)
    drops: dict[str, int] = field(default_factory=dict)  # the same, by cause
    stt: str | None = None


@dataclass
class BenchConfig:
    ota_url: str | None
    ws_url: str | None
    devices: int = 1
    ramp_up_s: float = 0.0
    turns: int = 1
    wavs: list[str] = field(default_factory=list)
    mode: str = "auto"
    protocol_version: int = 1
    think_s: float = 1.0
    reply_timeout_s: float = 60.0
    jitter: str | None = None  # downlink delays and stalls: wifi, 4g or delay=,jitter=,stall_every=,stall=


class ProcessWatcher:
    """CPU seconds and peak RSS of our service processes on this machine, sampled during a run."""

    def __init__(self) -> None:
        self.pids = self._find()
        self.cpu_start = {pid: cpu_seconds(pid) for pid in self.pids}
        self.peak_rss: dict[int, int] = {pid: 0 for pid in self.pids}
        self._task: asyncio.Task | None = None

    @staticmethod
    def _find() -> dict[int, str]:
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv if a]
            if len(args) >= 3 and args[1] == "-m" and args[2] in SERVICE_MODULES:
                found[int(entry.name)] = args[2]
        return found

    def start(self) -> None:
        async def sample() -> None:
            while True:
                for pid in self.pids:
                    self.peak_rss[pid] = max(self.peak_rss[pid], rss_bytes(pid))
                await asyncio.sleep(0.5)

        if self.pids:
            self._task = asyncio.create_task(sample())

    async def stop(self) -> dict[str, Any]:
        if self._task:
            self._task.cancel()
        by_service: dict[str, dict[str, float]] = {}
        for pid, name in self.pids.items():
            entry = by_service.setdefault(name, {"processes": 0, "cpu_s": 0.0, "peak_rss_mb": 0.0})
            entry["processes"] += 1
            entry["cpu_s"] += round(cpu_seconds(pid) - self.cpu_start[pid], 2)
            entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(max(self.peak_rss[pid], rss_bytes(pid)) / 1e6, 1))
        return by_service


class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.records: list[TurnRecord] = []
        self.connected = 0
        self.failed_connects: list[str] = []
        self.audio = {wav: read_wav(wav) for wav in config.wavs}
        self._progress_task: asyncio.Task | None = None
        self.started = 0.0

    async def run(self) -> dict[str, Any]:
        watcher = ProcessWatcher()
        watcher.start()
        self.started = time.monotonic()
        self._progress_task = asyncio.create_task(self._progress())
        tasks = []
        for i in range(self.config.devices):
            delay = self.config.ramp_up_s * i / max(1, self.config.devices)
            tasks.append(asyncio.create_task(self._device(i, delay)))
        devices = await asyncio.gather(*tasks)
        held = sum(1 for d in devices if d is not None and not d.closed)
        for d in devices:
            if d is not None:
                await d.close()
        self._progress_task.cancel()
        sys.stderr.write("\n")
        server = await watcher.stop()
        return self._result(held, server, time.monotonic() - self.started)

    async def _device(self, index: int, delay: float) -> SimDevice | None:
        await asyncio.sleep(delay)
        jitter = Jitter.parse(self.config.jitter, seed=index) if self.config.jitter else None
        device = SimDevice(ota_url=self.config.ota_url, ws_url=self.config.ws_url, protocol_version=self.config.protocol_version, jitter=jitter)
        try:
            await device.connect()
        except Exception as exc:  # noqa: BLE001 - a refused device is a result, not a crash
            self.failed_connects.append(f"{type(exc).__name__}: {exc}"[:200])
            self.records.append(TurnRecord(index, 0, "", False, reason=f"connect: {type(exc).__name__}"))
            return None
        self.connected += 1
        rng = random.Random(index)
        for turn in range(self.config.turns):
            wav = self.config.wavs[(index + turn) % len(self.config.wavs)]
            if device.closed:
                self.records.append(TurnRecord(index, turn, Path(wav).name, False, reason="connection closed"))
                break
            drops = device.drops
            causes = device.fw.drops.by_cause()
            try:
                # The next `listen start` is the device's own: auto mode sends it once playback
                # drained (speak waits for it), realtime never re-sends it.
                report = await device.speak(self.audio[wav], mode=self.config.mode, reply_timeout=self.config.reply_timeout_s)
            except Exception as exc:  # noqa: BLE001
                self.records.append(TurnRecord(index, turn, Path(wav).name, False, reason=f"{type(exc).__name__}"))
                break
            record = self._record(index, turn, wav, report)
            record.dropped_frames = device.drops - drops
            record.drops = {k: v - causes.get(k, 0) for k, v in device.fw.drops.by_cause().items() if v - causes.get(k, 0)}
            self.records.append(record)
            await asyncio.sleep(self.config.think_s * (0.5 + rng.random()))
        return device

    @staticmethod
    def _record(index: int, turn: int, wav: str, report: TurnReport) -> TurnRecord:
        ok = report.stopped and report.frames > 0 and report.error is None
        reason = report.error or ("" if report.frames else "no reply audio")
        return TurnRecord(
            index, turn, Path(wav).name, ok, reason=reason if not ok else "",
            latency_s=report.latency_s,
            stt_s=report.after_speech(report.stt_at),
            tts_start_s=report.after_speech(report.tts_start_at),
            first_sentence_s=report.after_speech(report.sentence_at),
            first_audio_s=report.after_speech(report.first_audio),
            frames=report.frames, underruns=report.underruns, overflow_frames=report.overflow_frames, stt=report.stt,
            max_gap_s=report.max_gap_s,
        )

    async def _progress(self) -> None:
        total = self.config.devices * self.config.turns
        while True:
            done = len(self.records)
            lat = [r.latency_s for r in self.records if r.ok and r.latency_s is not None]
            p50 = percentile(lat, 50)
            width = 30
            filled = int(width * done / max(1, total))
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} turns  "
                f"connected {self.connected}  p50 {p50 * 1000:.0f} ms  " if p50 is not None else
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} turns  connected {self.connected}  p50 -  "
            )
            sys.stderr.flush()
            await asyncio.sleep(0.5)

    def _result(self, held: int, server: dict[str, Any], elapsed: float) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        failures: dict[str, int] = {}
        for record in self.records:
            if not record.ok:
                failures[record.reason or "unknown"] = failures.get(record.reason or "unknown", 0) + 1

        def values(name: str) -> list[float]:
            return [getattr(r, name) for r in ok if getattr(r, name) is not None]

        return {
            "config": asdict(self.config),
            "elapsed_s": round(elapsed, 2),
            "turns": {"total": len(self.records), "ok": len(ok), "failed": len(self.records) - len(ok), "failures": failures},
            "voice_to_voice_s": summary(values("latency_s")),
            "stages_after_speech_end_s": {
                "stt": summary(values("stt_s")),
                "tts_start": summary(values("tts_start_s")),
                "first_sentence_start": summary(values("first_sentence_s")),
                "first_audio_frame": summary(values("first_audio_s")),
            },
            "downlink": {
                "frames": sum(r.frames for r in ok),
                "underruns": sum(r.underruns for r in ok),
                "turns_with_underruns": sum(1 for r in ok if r.underruns),
                "frames_over_device_buffer": sum(r.overflow_frames for r in ok),
                "frames_dropped_by_device": sum(r.dropped_frames for r in ok),
                "dropped_by_cause": {k: sum(r.drops.get(k, 0) for r in ok) for k in sorted({k for r in ok for k in r.drops})},
                "max_gap_s": summary(values("max_gap_s")),
            },
            "sessions": {"connected": self.connected, "held_at_end": held, "connect_failures": len(self.failed_connects)},
            "server_processes": server,
            "records": [asdict(r) for r in self.records],
        }


def print_table(result: dict[str, Any]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    turns = result["turns"]
    print(f"\nturns: {turns['ok']} ok, {turns['failed']} failed in {result['elapsed_s']} s")
    for reason, count in turns["failures"].items():
        print(f"  failed: {count} x {reason}")
    print(f"\n{'measure (ms after end of speech)':<34}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}")
    rows = [("voice-to-voice (first audio)", result["voice_to_voice_s"])]
    rows += [(f"  {k.replace('_', ' ')}", v) for k, v in result["stages_after_speech_end_s"].items()]
    for label, stats in rows:
        print(f"{label:<34}{ms(stats['p50']):>8}{ms(stats['p95']):>8}{ms(stats['p99']):>8}{ms(stats['max']):>8}")
    down = result["downlink"]
    print(f"\ndownlink: {down['frames']} frames, {down['underruns']} underruns in {down['turns_with_underruns']} turns, {down['frames_over_device_buffer']} frames beyond the 40-frame buffer, {down['frames_dropped_by_device']} dropped by the device" + (f" {down['dropped_by_cause']}" if down["dropped_by_cause"] else ""))
    gap = down["max_gap_s"]
    print(f"longest gap between reply frames (ms): p50 {ms(gap['p50'])}  p95 {ms(gap['p95'])}  max {ms(gap['max'])}" + (f"  (jitter {result['config']['jitter']})" if result["config"].get("jitter") else ""))
    sessions = result["sessions"]
    print(f"sessions: {sessions['connected']} connected, {sessions['held_at_end']} held at the end, {sessions['connect_failures']} failed to connect")
    if result["server_processes"]:
        print(f"\n{'service':<12}{'procs':>6}{'cpu s':>9}{'peak RSS MB':>13}")
        for name, entry in sorted(result["server_processes"].items()):
            print(f"{name:<12}{entry['processes']:>6}{entry['cpu_s']:>9.2f}{entry['peak_rss_mb']:>13.1f}")


async def run_bench(config: BenchConfig, json_path: str | None) -> int:
    result = await Bench(config).run()
    print_table(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"\nJSON written to {json_path}")
    return 0 if result["turns"]["ok"] else 1


__all__ = ["Bench", "BenchConfig", "run_bench", "percentile", "np"]
