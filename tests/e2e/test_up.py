"""`make run` (`xiaozhi up`) as a new user runs it: every service including the manager comes up,
the printed OTA URL serves a spoken turn, the printed manager sign-in works, Ctrl-C stops all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fixture_wav
from tests.manager.conftest import Api
from xiaozhi.sim import SimDevice, read_wav
from xiaozhi.stack import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


async def test_xiaozhi_up_serves_a_turn_and_the_manager(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("XZ_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["XZ_GATEWAY__PUBLIC_HOST"] = "127.0.0.1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xiaozhi.cli", "up", "--nats-port", str(free_port()), "--data-dir", str(tmp_path / "run")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any("Press Ctrl-C to stop." in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
            lines.append(line)
        out = "".join(lines)
        ota = re.search(r"OTA URL \(give this to the device\):\s+(\S+)", out).group(1)
        manager = re.search(r"Manager \(web console\):\s+(http://\S+)/ \(first sign-in: (\w+), password in (\S+)\)", out)
        assert manager, out
        base, user, password_file = manager.group(1), manager.group(2), Path(manager.group(3))
        assert password_file.is_relative_to(tmp_path / "run")  # the data folder, not the repository

        async with SimDevice(ota_url=ota.replace(re.search(r"//([^:/]+)", ota).group(1), "127.0.0.1")) as device:
            report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
            assert report.error is None and report.stt and report.frames > 0, report

        api = Api(base.replace(re.search(r"//([^:/]+)", base).group(1), "127.0.0.1")).login(user, password_file.read_text().strip())
        assert api.call("GET", "/api/me")[1]["role"] == "admin"
        import urllib.request

        with urllib.request.urlopen(api.base + "/", timeout=10) as page:
            assert "Xiaozhi console" in page.read().decode()
        assert (tmp_path / "run" / "manager.db").is_file()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate()
        lines.append(rest or "")
    assert "Stopped." in "".join(lines), "".join(lines)
    assert proc.returncode == 0
