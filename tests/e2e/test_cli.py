"""The `xiaozhi sim` command as a user runs it, against the running pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import pytest

from tests.conftest import fixture_wav

pytestmark = pytest.mark.e2e


def sim(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xiaozhi.cli", "sim", *args], capture_output=True, text=True, timeout=timeout)


def test_sim_speaks_a_wav_and_saves_the_reply(pipeline, tmp_path):
    out = tmp_path / "reply.wav"
    result = sim("--ota", pipeline.ota_url, "--wav", str(fixture_wav("en_what_time.wav")), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stt:       'What time is it?'" in result.stdout
    assert "latency:" in result.stdout and " ms (end of speech to first reply audio)" in result.stdout
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 24000 and wav.getnframes() > 24000


def test_sim_wake_word_abort_and_json(pipeline, tmp_path):
    result = sim(
        "--ws", pipeline.ws_url, "--wake-word", "你好小智", "--wav", str(fixture_wav("en_what_time.wav")),
        "--text", "Tell me a long story about a dragon and a knight.", "--abort-after", "0.5",
        "--protocol-version", "3", "--json", "--out", str(tmp_path / "r.wav"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = json.loads(result.stdout)
    assert len(reports) == 2
    # The wake word's pre-roll is the recorded 你好小智, not the question: heard once, alone.
    assert reports[0]["stt"] == "What time is it?", reports[0]
    story = reports[1]
    assert story["stopped"] and story["events"][-1] == "tts.stop"
    # Aborted half a second into the reply: far less audio than a long story.
    assert story["audio_s"] < 2.5, story["audio_s"]


async def test_sim_waits_for_activation_like_the_firmware(pipeline, tmp_path):
    """With binding on, the firmware connects only once its code is bound: `xiaozhi sim` prints
    the code it would speak, polls activate, and talks after the owner bound it (here over NATS,
    as the manager and `xiaozhi bind` do)."""
    import asyncio
    import re

    from nats.aio.client import Client as NATS

    from tests.conftest import start_gateway

    gateway = start_gateway(pipeline.stack, BINDING="true", BINDING_DB=str(tmp_path / "bindings.db"))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xiaozhi.cli", "sim", "--ota", gateway.http_url + "/xiaozhi/ota/", "--text", "What time is it?",
            "--activation-timeout", "60", "--out", str(tmp_path / "r.wav"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        first = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        found = re.search(r"activation: device (\S+) speaks code (\d{6})", first)
        assert found, first
        await asyncio.sleep(4)  # still waiting: not connected before it is bound
        assert proc.returncode is None
        nc = NATS()
        await nc.connect(pipeline.nats_url)
        try:
            reply = await nc.request("xz.gateway.bind", json.dumps({"code": found.group(2), "owner": "alice"}).encode(), timeout=5)
        finally:
            await nc.close()
        assert json.loads(reply.data)["device_id"] == found.group(1)
        rest, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, (first + rest.decode() + err.decode())
        assert f"device {found.group(1)} connected" in rest.decode()
        assert "sentence:" in rest.decode()
    finally:
        gateway.stop()
