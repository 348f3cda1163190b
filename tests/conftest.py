"""Shared fixtures: a real nats-server on a free port, and the real services as processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from shared.messages import OutEvent, SentenceJob, UserTurn
from tests.standins import engines as standin_engines
from shared.natsauth import generate as generate_nats_users
from shared.natsauth import inbox_prefix
from shared.subjects import Subjects
from xiaozhi.stack import SERVICES, Stack, free_port, nats_server_binary, wait_tcp

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "audio"


def fixture_wav(name: str) -> Path:
    path = FIXTURES / name
    assert path.is_file(), f"missing fixture {path}"
    return path


@dataclass
class RunningStack:
    stack: Stack
    nats_url: str
    ws_port: int
    http_port: int
    metrics: dict[str, int]
    log_dir: Path

    @property
    def ota_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/xiaozhi/ota/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/xiaozhi/v1/"

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.asynccontextmanager
async def local_http(app):
    """Serve an aiohttp app on a free loopback port: a stand-in for an outside service's API."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class ExtraGateway:
    """A gateway process started by a test, with its own settings, on an existing NATS."""

    proc: object
    ws_port: int
    http_port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/xiaozhi/v1/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stop(self) -> None:
        self.proc.popen.terminate()  # type: ignore[attr-defined]
        self.proc.popen.wait(10)  # type: ignore[attr-defined]


def start_gateway(stack: Stack, **settings: str) -> ExtraGateway:
    """Start a gateway on free ports, bound to 127.0.0.1; ``settings`` are XZ_GATEWAY__<KEY> values."""
    ws_port, http_port = free_port(), free_port()
    env = {"XZ_GATEWAY__HOST": "127.0.0.1", "XZ_GATEWAY__PUBLIC_HOST": "127.0.0.1", "XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(http_port)}
    env.update({f"XZ_GATEWAY__{key.upper()}": value for key, value in settings.items()})
    proc = stack.start_service("gateway", free_port(), env)
    stack.wait_healthy([proc])
    return ExtraGateway(proc, ws_port, http_port)


def make_song(path: Path, seconds: float, rate: int = 44100) -> Path:
    """A short stereo melody as a WAV file: music for play_music tests."""
    import wave

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    notes = [261.6, 329.6, 392.0, 523.3]
    freq = np.array([notes[int(x * 2) % len(notes)] for x in t])
    tone = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.stack([tone, tone], axis=1).tobytes())
    return path


def start_nats(stack: Stack, tmp: Path) -> str:
    return stack.start_nats(free_port(), "127.0.0.1", str(tmp / "jetstream"))


@contextlib.contextmanager
def nats_with_users(tmp: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real nats-server with the users and permissions `xiaozhi nats-auth` generates, the
    stack's streams, buckets and object stores made by the admin user with `xiaozhi nats-setup`
    (the service users may not make them), as `xiaozhi up`, compose and the Kubernetes Job do.
    Yields (URL, password by user)."""
    config, passwords = generate_nats_users()
    port = free_port()
    conf = tmp / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream: {{ store_dir: "{tmp / "js"}" }}\n' + config)
    log = open(tmp / "nats.log", "ab")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_tcp("127.0.0.1", port, 10), (tmp / "nats.log").read_text()
        url = f"nats://127.0.0.1:{port}"
        # The bootstrap as a user runs it: the CLI with the admin's password file.
        (tmp / "admin.password").write_text(passwords["admin"] + "\n")
        env = {**os.environ, "XZ_NATS__URL": url, "XZ_NATS__USER": "admin", "XZ_NATS__PASSWORD_FILE": str(tmp / "admin.password"), "XZ_LOG_JSON": "false"}
        done = subprocess.run([sys.executable, "-m", "xiaozhi.cli", "nats-setup", "--timeout", "30"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
        yield url, passwords
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def tmp_session_dir():
    with tempfile.TemporaryDirectory(prefix="xz-test-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
def pipeline(tmp_session_dir: Path):
    """The whole pipeline: nats-server plus every service as its own process."""
    log_dir = tmp_session_dir / "logs"
    music = tmp_session_dir / "music"
    make_song(music / "Sunny_Morning_Tune.wav", seconds=4.0)
    stack = Stack(
        env={
            "XZ_LOG_JSON": "true",
            "PYTHONUNBUFFERED": "1",
            "XZ_GATEWAY__HOST": "127.0.0.1",
            "XZ_TOOLS__MUSIC_DIR": str(music),
            # A real MCP server (stdio) from the test fixtures, as users configure "mcpServers".
            "XZ_TOOLS__MCP_SERVERS": json.dumps({"demo": {"command": sys.executable, "args": [str(Path(__file__).parent / "fixtures" / "mcp_server.py")]}}),
            # Remote ASR engines, each at the port its stand-in serves on when a test runs it.
            **standin_engines.env(),
        },
        log_dir=log_dir,
    )
    try:
        start_nats(stack, tmp_session_dir)
        ws_port, http_port = free_port(), free_port()
        gateway_env = {
            "XZ_GATEWAY__WS_PORT": str(ws_port),
            "XZ_GATEWAY__HTTP_PORT": str(http_port),
            "XZ_GATEWAY__PUBLIC_HOST": "127.0.0.1",
        }
        metrics = {}
        for name in SERVICES:
            metrics[name] = free_port()
            stack.start_service(name, metrics[name], gateway_env if name == "gateway" else None)
        stack.wait_healthy(timeout=180)
        yield RunningStack(stack, stack.nats_url or "", ws_port, http_port, metrics, log_dir)
    finally:
        stack.stop()
        if os.environ.get("XZ_TEST_KEEP_LOGS"):
            keep = Path(os.environ["XZ_TEST_KEEP_LOGS"])
            keep.mkdir(parents=True, exist_ok=True)
            for path in log_dir.glob("*.log"):
                (keep / path.name).write_bytes(path.read_bytes())


@pytest.fixture
def nats_only(tmp_path: Path):
    """A fresh nats-server for tests that start their own service processes."""
    stack = Stack(env={"XZ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}, log_dir=tmp_path / "logs")
    try:
        start_nats(stack, tmp_path)
        yield stack
    finally:
        stack.stop()


@pytest.fixture
async def nc(nats_only):
    """A client of the test's nats-server."""
    client = NATS()
    await client.connect(nats_only.nats_url)
    yield client
    await client.close()


def start(stack, name: str, env: dict[str, str] | None = None):
    proc = stack.start_service(name, free_port(), env)
    stack.wait_healthy([proc], timeout=120)
    return proc


async def collect_llm_turn(nc: NATS, session: str, turn: UserTurn, timeout: float = 60):
    """Hand the LLM stage a turn as the ASR does; its events to the gateway and sentences to TTS."""
    subjects = Subjects()
    out = await nc.subscribe(subjects.out(session))
    tts = await nc.subscribe(subjects.tts(session))
    await nc.publish(subjects.llm(session), turn.encode())
    events: list[OutEvent] = []
    jobs: list[SentenceJob] = []
    deadline = time.monotonic() + timeout
    while not events or events[-1].kind != "turn_end":
        assert time.monotonic() < deadline, "no turn_end"
        msg = await out.next_msg(timeout=timeout)
        events.append(OutEvent.decode(msg.data))
    while True:
        try:
            jobs.append(SentenceJob.decode((await tts.next_msg(timeout=0.5)).data))
        except asyncio.TimeoutError:
            break
    return events, jobs


async def try_as(url: str, user: str, password: str, action) -> list[str]:
    """Run ``action(nc)`` as ``user``; returns the errors NATS reported."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = NATS()
    await nc.connect(url, user=user, password=password, error_cb=on_error, allow_reconnect=False, inbox_prefix=inbox_prefix(user))
    try:
        await action(nc)
        await nc.flush(timeout=2)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    return errors


def violation(errors: list[str]) -> bool:
    return any("permissions violation" in e.lower() for e in errors)


async def device_with_agent(pipeline, **agent) -> str:
    """A fresh device id whose agent (in the manager's KV bucket) is ``agent``, e.g.
    asr_model, language; memory is off."""
    from shared.agents import AgentConfig, save_agent
    from xiaozhi.sim import random_mac

    device_id = random_mac()
    client = NATS()
    await client.connect(pipeline.nats_url)
    try:
        await save_agent(await client.jetstream().key_value("xz_agents"), device_id, AgentConfig(memory=agent.pop("memory", "none"), **agent))
    finally:
        await client.close()
    return device_id


def log_records(text: str, msg: str, session_id: str | None = None) -> list[dict]:
    """A service log's JSON records with this ``msg`` (and session), oldest first."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == msg and (session_id is None or record.get("session_id") == session_id):
            out.append(record)
    return out
