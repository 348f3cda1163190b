"""`make run` (`xiaozhi up`) as a new user runs it: every service including the manager comes up,
the printed OTA URL serves a spoken turn, the printed manager sign-in works; the embedded NATS
lets in only the generated users, the metrics ports listen on loopback only, a service that
dies is started again; Ctrl-C stops all."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from gateway.ota import lan_ip
from shared import natsauth
from shared.settings import Settings
from tests.conftest import fixture_wav, try_as, violation
from tests.manager.conftest import Api
from xiaozhi.sim import SimDevice, read_wav
from xiaozhi.stack import GaveUp, Stack, free_port, healthy, local_nats

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


class Up:
    """A running `xiaozhi up` and what it printed."""

    def __init__(self, proc: subprocess.Popen, data: Path) -> None:
        self.proc, self.data = proc, data
        self.lines: list[str] = []
        # Read all the time: the services write to this pipe too, and a full pipe would stall them.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    async def read_until(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None or self.reader.is_alive(), self.out
            assert time.monotonic() < deadline, self.out
            await asyncio.sleep(0.1)

    def metrics_ports(self) -> dict[str, int]:
        line = next(line for line in self.lines if "Metrics:" in line)
        return {name: int(port) for name, port in re.findall(r"(\w+) http://127\.0\.0\.1:(\d+)/metrics", line)}

    def service_pid(self, module: str) -> int:
        """The pid of `xiaozhi up`'s child running ``python -m <module>``."""
        for path in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            for pid in path.read_text().split():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if module.encode() in cmdline:
                    return int(pid)
        raise AssertionError(f"no child runs {module}")


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XZ_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["XZ_GATEWAY__PUBLIC_HOST"] = "127.0.0.1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "xiaozhi.cli", "up", "--nats-port", str(free_port()), "--data-dir", str(tmp / "run")],
        cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    running = Up(proc, tmp / "run")
    try:
        asyncio.run(running.read_until("Press Ctrl-C to stop.", 300))
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def test_xiaozhi_up_serves_a_turn_and_the_manager(up):
    out = up.out
    ota = re.search(r"OTA URL \(give this to the device\):\s+(\S+)", out).group(1)
    manager = re.search(r"Manager \(web console\):\s+(http://\S+)/ \(first sign-in: (\w+), password in (\S+)\)", out)
    assert manager, out
    base, user, password_file = manager.group(1), manager.group(2), Path(manager.group(3))
    assert password_file.is_relative_to(up.data)  # the data folder, not the repository

    async with SimDevice(ota_url=ota.replace(re.search(r"//([^:/]+)", ota).group(1), "127.0.0.1")) as device:
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert report.error is None and report.stt and report.frames > 0, report

    api = Api(base.replace(re.search(r"//([^:/]+)", base).group(1), "127.0.0.1")).login(user, password_file.read_text().strip())
    assert api.call("GET", "/api/me")[1]["role"] == "admin"
    with urllib.request.urlopen(api.base + "/", timeout=10) as page:
        assert "Xiaozhi console" in page.read().decode()
    assert (up.data / "manager.db").is_file()


async def test_the_embedded_nats_lets_in_only_the_generated_users(up):
    url = re.search(r"Embedded nats-server \(JetStream\) at (\S+),", up.out).group(1)
    folder = up.data / "nats-auth"
    assert (folder / "url").read_text().strip() == url
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for user in natsauth.USERS:
        assert stat.S_IMODE((folder / f"{user}.password").stat().st_mode) == 0o600, user
    assert stat.S_IMODE((folder / "auth.conf").stat().st_mode) == 0o600
    # Any other local process: no anonymous access, no guessed password.
    for kwargs in ({}, {"user": "llm", "password": "guess"}):
        nc = NATS()
        with pytest.raises(Exception):
            await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **kwargs)
    # A local command finds the credentials in the data folder (as `xiaozhi bind` can): the
    # manager's user, confined like the manager (it may claim a device by code, not read audio).
    nats = local_nats(Settings(), up.data)
    assert nats.url == url and nats.user == "manager"
    errors = await try_as(url, nats.user, nats.secret(), lambda nc: nc.publish("xz.gateway.bind", b"{}"))
    assert not violation(errors), errors
    errors = await try_as(url, nats.user, nats.secret(), lambda nc: nc.subscribe("xz.audio.*"))
    assert violation(errors), errors
    # Each service ran as its own user (their logs are `xiaozhi up`'s output): no permission it
    # lacked, no stream or bucket it found missing.
    assert "permissions violation" not in up.out.lower(), [line for line in up.lines if "ermission" in line][:3]
    assert "may not create it" not in up.out


async def test_xiaozhi_bind_finds_the_embedded_nats_and_its_user(up):
    """`xiaozhi bind` beside a running `xiaozhi up` connects as the manager user it finds in the
    data folder (the embedded NATS lets nobody in anonymously) and its request reaches the
    gateways there. (This stack runs without binding, so a stand-in gateway, connected as the
    gateway user, answers the code as a gateway holding it would.)"""
    url = (up.data / "nats-auth" / "url").read_text().strip()
    password = (up.data / "nats-auth" / "gateway.password").read_text().strip()
    nc = NATS()
    await nc.connect(url, user="gateway", password=password, inbox_prefix=natsauth.inbox_prefix("gateway"))
    asked: list[dict] = []

    async def holder(msg) -> None:
        asked.append(json.loads(msg.data))
        await msg.respond(json.dumps({"device_id": "aa:bb:cc:00:11:22"}).encode())

    try:
        await nc.subscribe("xz.gateway.bind", cb=holder)
        await nc.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("XZ_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xiaozhi.cli", "bind", "123456", "--owner", "alice", "--data-dir", str(up.data),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await nc.close()
    assert proc.returncode == 0, (out + err).decode()
    assert "bound device aa:bb:cc:00:11:22 to alice" in out.decode()
    assert asked == [{"code": "123456", "owner": "alice"}]


def test_the_metrics_ports_listen_on_loopback_only(up):
    ports = up.metrics_ports()
    assert set(ports) >= {"gateway", "vad", "asr", "llm", "tts", "tools", "manager"}, ports
    for name, port in ports.items():
        assert healthy(port), name  # 127.0.0.1 answers
    address = lan_ip()
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try the metrics ports on")
    for name, port in ports.items():
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


async def test_a_service_that_dies_is_started_again(up):
    ports = up.metrics_ports()
    pid = up.service_pid("tts_svc")
    os.kill(pid, signal.SIGKILL)
    await up.read_until("tts restarted (restart 1", 60)
    assert re.search(r"tts exited with code -9 after \d+ s; restarting it in 1 s \(restart 1\)", up.out), up.out
    deadline = time.monotonic() + 120
    while not healthy(ports["tts"]):
        assert time.monotonic() < deadline, up.out
        await asyncio.sleep(0.5)
    assert up.service_pid("tts_svc") != pid
    # Everything else kept running, and a turn is spoken again (by the new TTS worker).
    assert all(healthy(port) for port in ports.values())
    ota = re.search(r"OTA URL \(give this to the device\):\s+(\S+)", up.out).group(1)
    async with SimDevice(ota_url=ota.replace(re.search(r"//([^:/]+)", ota).group(1), "127.0.0.1")) as device:
        report = await device.type_text("Tell me a short joke.")
        assert report.error is None and report.frames > 0, report


def test_ctrl_c_stops_everything(up):
    up.proc.send_signal(signal.SIGINT)
    up.proc.wait(timeout=60)
    up.reader.join(10)
    assert "Stopped." in up.out, up.out
    assert up.proc.returncode == 0
    assert not (up.data / "nats-auth" / "url").exists()


def test_supervision_gives_up_on_a_service_that_keeps_crashing(tmp_path):
    """A service that cannot start (here: a bad setting) is not restarted for ever."""
    stack = Stack(env={"XZ_WORK__REPLICAS": "not-a-number", "PYTHONUNBUFFERED": "1"}, log_dir=tmp_path)
    said: list[str] = []
    stack.start_service("tools", free_port())
    try:
        deadline = time.monotonic() + 60
        with pytest.raises(GaveUp) as gave_up:
            while time.monotonic() < deadline:
                stack.supervise(said.append, max_fast_crashes=3)
                time.sleep(0.1)
        assert "tools exited with code 2 3 times in a row" in str(gave_up.value)
        assert "bad settings" in str(gave_up.value)  # the log's tail says why
        # Two restarts (after 1 s, then 2 s), then the third fast crash ends it.
        assert len([s for s in said if "restarted" in s]) == 2, said
        assert re.search(r"tools exited with code 2 after \d+ s; restarting it in 2 s \(restart 2\)", "\n".join(said)), said
        assert stack.procs[0].restarts == 2
    finally:
        stack.stop()


def test_local_nats_reads_the_data_folder_and_leaves_external_settings(tmp_path):
    settings = Settings()
    assert local_nats(settings, tmp_path) == settings.nats  # no `xiaozhi up` there
    stack = Stack()
    stack.start_nats(free_port(), "127.0.0.1", str(tmp_path / "js"), log_file=str(tmp_path / "nats.log"), auth_dir=tmp_path / "nats-auth")
    try:
        (tmp_path / "nats-auth" / "url").write_text(stack.nats_url + "\n")
        nats = local_nats(settings, tmp_path, user="manager")
        assert (nats.url, nats.user, nats.secret()) == (stack.nats_url, "manager", (tmp_path / "nats-auth/manager.password").read_text().strip())
        # Settings that name a user already (an external NATS) are kept.
        own = settings.model_copy(update={"nats": settings.nats.model_copy(update={"user": "gateway"})})
        assert local_nats(own, tmp_path) == own.nats
    finally:
        stack.stop()
