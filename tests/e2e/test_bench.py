"""`xiaozhi bench` against the running pipeline: it measures, and its JSON says what it saw."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import fixture_wav

pytestmark = pytest.mark.e2e


def test_bench_three_devices_two_turns(pipeline, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "xiaozhi.cli", "bench", "--ota", pipeline.ota_url, "--devices", "3", "--turns", "2",
         "--ramp-up", "0.5", "--think", "0.2", "--wav", str(fixture_wav("en_what_time.wav")), "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "voice-to-voice (first audio)" in result.stdout
    data = json.loads(out.read_text())
    assert data["turns"] == {"total": 6, "ok": 6, "failed": 0, "failures": {}}
    v2v = data["voice_to_voice_s"]
    assert v2v["count"] == 6 and set(v2v) == {"count", "p50", "p95", "p99", "max"}  # no timing asserted
    stages = data["stages_after_speech_end_s"]
    # The device sees stt before tts start before the first sentence before the first frame.
    assert stages["stt"]["p50"] <= stages["tts_start"]["p50"] <= stages["first_sentence_start"]["p50"] <= stages["first_audio_frame"]["p50"]
    assert data["downlink"]["frames_over_device_buffer"] == 0 and data["downlink"]["frames"] > 0
    # The strict device (xiaozhi/firmware.py) played every frame: none outside speaking, none
    # beyond its decode queue, none flushed; and it sent its own `listen start` between turns.
    assert data["downlink"]["frames_dropped_by_device"] == 0
    assert data["sessions"]["connected"] == 3 and data["sessions"]["held_at_end"] == 3
    assert set(data) >= {"config", "elapsed_s", "turns", "voice_to_voice_s", "stages_after_speech_end_s", "downlink", "sessions", "server_processes", "records"}
    assert all(r["stt"] and "time" in r["stt"].lower() for r in data["records"])


def test_bench_with_network_jitter_reports_what_the_device_heard(pipeline, tmp_path):
    """`--jitter`: downlink delays and stalls as on a 4G link; smoothness is measured (underruns,
    the longest gap between frames), not assumed."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "xiaozhi.cli", "bench", "--ota", pipeline.ota_url, "--devices", "1", "--turns", "1",
         "--ramp-up", "0", "--think", "0", "--jitter", "delay=40,jitter=20,stall_every=2,stall=900",
         "--wav", str(fixture_wav("en_joke.wav")), "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "longest gap between reply frames" in result.stdout
    data = json.loads(out.read_text())
    assert data["config"]["jitter"] == "delay=40,jitter=20,stall_every=2,stall=900"
    down = data["downlink"]
    assert data["turns"]["ok"] == 1 and down["frames"] > 0
    assert down["max_gap_s"]["count"] == 1 and set(down) >= {"underruns", "turns_with_underruns", "frames_dropped_by_device"}
    record = data["records"][0]
    assert record["max_gap_s"] is not None and record["underruns"] >= 0
