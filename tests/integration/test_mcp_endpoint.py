"""The MCP endpoint for external bridges, with a real bridge from PyPI.

The bridge is ``xiaozhi-mcp`` (the packaged ``mcp_pipe.py`` of the xiaozhi ecosystem): it
connects as a WebSocket client to ``MCP_ENDPOINT`` and pipes the frames to and from a stdio MCP
server it starts, here tests/fixtures/mcp_server.py. The tools worker is the MCP client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from nats.aio.client import Client as NATS
from websockets.exceptions import InvalidStatus

from shared.agents import AgentConfig, save_agent
from shared.messages import ToolCall, ToolList, ToolResult
from shared.subjects import Subjects
from xiaozhi.stack import free_port

S = Subjects()
SERVER = str(Path(__file__).parents[1] / "fixtures" / "mcp_server.py")
FIXTURE_TOOLS = {"add", "shout", "fail_hard", "slow_echo"}
DEVICE_A, DEVICE_B, DEVICE_OTHER = "aa:00:00:00:00:01", "bb:00:00:00:00:02", "cc:00:00:00:00:03"
# Bridge tokens are at least 32 characters (shorter ones are refused at settings load).
TOKEN_A, TOKEN_B = "token-a-" + "a" * 32, "token-b-" + "b" * 32


class Bridges:
    """``python -m xiaozhi_mcp <server script>`` processes, each in its own process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, endpoint: str, tag: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MCP_ENDPOINT=endpoint, MCP_TEST_TAG=tag, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "xiaozhi_mcp", SERVER],
            cwd=self.log_dir, env=env, start_new_session=True,
            stdout=open(self.log_dir / f"bridge-{name}.log", "ab"), stderr=subprocess.STDOUT,
        )

    def kill(self, name: str) -> None:
        """Kill the bridge and the MCP server it started (same process group)."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def log(self, name: str) -> str:
        return (self.log_dir / f"bridge-{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def bridges(tmp_path: Path):
    found = Bridges(tmp_path / "bridges")
    try:
        yield found
    finally:
        found.stop()


async def tools_of(nc: NATS, device_id: str | None) -> dict:
    body = json.dumps({"device_id": device_id}).encode() if device_id is not None else b""
    return {t.name: t for t in ToolList.decode((await nc.request(S.tools_list, body, timeout=5)).data).tools}


async def call(nc: NATS, device_id: str, name: str, **arguments) -> ToolResult:
    request = ToolCall(name=name, arguments=arguments, device_id=device_id)
    return ToolResult.decode((await nc.request(S.tool(name), request.encode(), timeout=40)).data)


async def wait_tools(nc: NATS, device_id: str, present: set[str], absent: set[str] = frozenset(), timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        tools = await tools_of(nc, device_id)
        if present <= set(tools) and not absent & set(tools):
            return tools
        assert time.monotonic() < deadline, f"{device_id}: tools never became {sorted(present)} without {sorted(absent)}: {sorted(tools)}"
        await asyncio.sleep(0.2)


async def test_bridges_offer_tools_to_their_agents_devices(nats_only, bridges):
    port = free_port()
    proc = nats_only.start_service("tools", free_port(), {
        "XZ_TOOLS__MCP_ENDPOINT__ENABLED": "true",
        "XZ_TOOLS__MCP_ENDPOINT__HOST": "127.0.0.1",
        "XZ_TOOLS__MCP_ENDPOINT__PORT": str(port),
        "XZ_TOOLS__MCP_ENDPOINT__TOKENS": json.dumps({TOKEN_A: "agent-a", TOKEN_B: "agent-b"}),
    })
    nats_only.wait_healthy([proc], timeout=60)
    endpoint = f"ws://127.0.0.1:{port}/mcp/"
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        agents = await nc.jetstream().key_value("xz_agents")
        await save_agent(agents, DEVICE_A, AgentConfig(agent_id="agent-a", name="Ada"))
        await save_agent(agents, DEVICE_B, AgentConfig(agent_id="agent-b", name="Bob"))

        # An unknown token, or none, is refused in the handshake.
        for url in (f"{endpoint}?token=wrong", endpoint):
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(url, open_timeout=5):
                    pass
            assert refused.value.response.status_code == 401

        bridges.start("a", f"{endpoint}?token={TOKEN_A}", tag="A")
        tools_a = await wait_tools(nc, DEVICE_A, FIXTURE_TOOLS)
        # Every page of the bridge's tools/list (the fixture pages by two), names unchanged,
        # except the one that would shadow the server's own get_time plugin.
        assert "bridge_get_time" in tools_a and tools_a["get_time"].description != tools_a["bridge_get_time"].description
        assert tools_a["add"].parameters["properties"]["b"]["type"] == "integer"
        assert "add" in tools_a["add"].keywords
        # Not offered to a device of another agent, to a device without an agent entry
        # (the default agent), nor to a list request without a device.
        for device in (DEVICE_B, DEVICE_OTHER, None):
            assert not FIXTURE_TOOLS & set(await tools_of(nc, device)), device
        assert "get_time" in await tools_of(nc, None)  # plugins are for everyone

        # Calls go to the bridge, through it to the MCP server, and back.
        added = await call(nc, DEVICE_A, "add", a=2, b=40)
        assert (added.ok, added.action, added.text) == (True, "reqllm", "42")
        assert (await call(nc, DEVICE_A, "bridge_get_time")).text == "It is always tea time."
        failed = await call(nc, DEVICE_A, "fail_hard", reason="on purpose")
        assert not failed.ok and failed.action == "error" and "boom: on purpose" in failed.text
        # Another agent's device cannot call them.
        denied = await call(nc, DEVICE_B, "add", a=1, b=1)
        assert not denied.ok and "unknown tool" in denied.text

        # A second agent's bridge: each device's calls reach its own agent's bridge.
        bridges.start("b", f"{endpoint}?token={TOKEN_B}", tag="B")
        await wait_tools(nc, DEVICE_B, FIXTURE_TOOLS)
        assert (await call(nc, DEVICE_A, "shout", text="hello")).text == "HELLO! (A)"
        assert (await call(nc, DEVICE_B, "shout", text="hello")).text == "HELLO! (B)"

        # The bridge goes away during a call: the call fails cleanly, its tools go, B's stay.
        pending = asyncio.create_task(call(nc, DEVICE_A, "slow_echo", text="zzz", seconds=8))
        await asyncio.sleep(1.0)
        bridges.kill("a")
        lost = await asyncio.wait_for(pending, 15)
        assert not lost.ok and lost.action == "error" and "agent-a" in lost.text
        await wait_tools(nc, DEVICE_A, set(), absent=FIXTURE_TOOLS)
        gone = await call(nc, DEVICE_A, "shout", text="anyone?")
        assert not gone.ok and gone.action == "error"
        assert (await call(nc, DEVICE_B, "shout", text="still here")).text == "STILL HERE! (B)"
        assert proc.alive()
    finally:
        await nc.close()
