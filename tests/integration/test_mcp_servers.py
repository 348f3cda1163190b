"""Server-side MCP servers: the tools worker connects to real MCP servers over stdio, SSE and
streamable HTTP (tests/fixtures/mcp_server.py, built with the official SDK) and serves their
tools over NATS."""

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
from nats.aio.client import Client as NATS

from shared.messages import ToolCall, ToolList, ToolResult
from shared.subjects import Subjects
from xiaozhi.stack import free_port, wait_tcp

S = Subjects()
SERVER = str(Path(__file__).parents[1] / "fixtures" / "mcp_server.py")
FIXTURE_TOOLS = {"add", "shout", "fail_hard", "slow_echo", "get_time"}


class HttpServers:
    """MCP servers over HTTP, as processes of their own that a test starts and stops."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, transport: str, port: int, tag: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"mcp-{tag}.log", "ab")
        self.procs[port] = subprocess.Popen(
            [sys.executable, SERVER, "--transport", transport, "--port", str(port), "--tag", tag],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        assert wait_tcp("127.0.0.1", port, 20), f"the {transport} MCP server did not start"

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)


@pytest.fixture
def http_servers(tmp_path: Path):
    servers = HttpServers(tmp_path / "mcp-logs")
    try:
        yield servers
    finally:
        servers.stop()


async def list_tools(nc: NATS) -> dict:
    return {t.name: t for t in ToolList.decode((await nc.request(S.tools_list, b"", timeout=5)).data).tools}


async def call(nc: NATS, name: str, **arguments) -> ToolResult:
    reply = await nc.request(S.tool(name), ToolCall(name=name, arguments=arguments, device_id="d").encode(), timeout=40)
    return ToolResult.decode(reply.data)


async def wait_for_tools(nc: NATS, present: set[str], absent: set[str] = frozenset(), timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        tools = await list_tools(nc)
        if present <= set(tools) and not absent & set(tools):
            return tools
        assert time.monotonic() < deadline, f"tools never became {sorted(present)} without {sorted(absent)}: {sorted(tools)}"
        await asyncio.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_mcp_servers_over_stdio_sse_and_streamable_http(nats_only, http_servers, tmp_path):
    sse_port, http_port, late_port = free_port(), free_port(), free_port()
    http_servers.start("sse", sse_port, "sse")
    http_servers.start("streamable-http", http_port, "http")
    pidfile = tmp_path / "stdio-server.pid"
    servers = {
        "local": {"command": sys.executable, "args": [SERVER, "--tag", "stdio", "--pidfile", str(pidfile)], "call_timeout_s": 1},
        "remote": {"url": f"http://127.0.0.1:{sse_port}/sse", "transport": "sse"},
        "web.api": {"url": f"http://127.0.0.1:{http_port}/mcp", "transport": "streamableHttp"},
        # Down at start: picked up by the retry once it is up.
        "late": {"url": f"http://127.0.0.1:{late_port}/mcp", "transport": "streamable-http", "retry_s": 0.3, "timeout": 3},
        # A broken entry is logged and skipped; it does not stop the worker.
        "broken": {"transport": "carrier-pigeon"},
    }
    proc = nats_only.start_service("tools", free_port(), {"XZ_TOOLS__MCP_SERVERS": json.dumps(servers)})
    nats_only.wait_healthy([proc], timeout=60)
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        tools = await list_tools(nc)
        # Every tool of every page (the fixture pages by two), prefixed and sanitised.
        for prefix in ("local", "remote", "web_api"):
            assert {f"{prefix}_{t}" for t in FIXTURE_TOOLS} <= set(tools), sorted(tools)
        assert not any(name.startswith(("late_", "broken_")) for name in tools)
        assert "get_time" in tools and tools["get_time"].keywords  # the plugin keeps its name
        add = tools["local_add"]
        assert add.parameters["properties"]["a"]["type"] == "integer"
        assert sorted(add.parameters["required"]) == ["a", "b"]
        assert add.description == "Add two whole numbers and return the sum."
        assert {"add", "local"} <= set(add.keywords)
        assert {"slow", "echo", "web", "api"} <= set(tools["web_api_slow_echo"].keywords)

        # Calls over each transport reach the right server.
        added = await call(nc, "local_add", a=2, b=3)
        assert (added.ok, added.action, added.text) == (True, "reqllm", "5")
        assert (await call(nc, "local_shout", text="hi")).text == "HI! (stdio)"
        assert (await call(nc, "remote_shout", text="hi")).text == "HI! (sse)"
        assert (await call(nc, "web_api_shout", text="hi")).text == "HI! (http)"
        assert (await call(nc, "web_api_get_time")).text == "It is always tea time."

        # A tool that raises: an error result with the server's message.
        failed = await call(nc, "remote_fail_hard", reason="because")
        assert not failed.ok and failed.action == "error" and "boom: because" in failed.text
        # Arguments are checked against the server's schema before the call.
        invalid = await call(nc, "web_api_add", a=1)
        assert not invalid.ok and "missing required argument 'b'" in invalid.text
        # A call that takes longer than the server's call timeout (1 s here) ends in an error.
        started = time.monotonic()
        slow = await call(nc, "local_slow_echo", text="zzz", seconds=5)
        assert not slow.ok and slow.action == "error" and "timed out" in slow.text
        assert time.monotonic() - started < 4
        # The stdio server still works after a timed-out call.
        assert (await call(nc, "local_add", a=20, b=22)).text == "42"

        # The server that was down at start is picked up once it comes up.
        http_servers.start("streamable-http", late_port, "late")
        await wait_for_tools(nc, {"late_add", "late_shout"})
        assert (await call(nc, "late_shout", text="finally")).text == "FINALLY! (late)"

        # A server that dies: its calls fail cleanly, then its tools are withdrawn.
        http_servers.kill(http_port)
        gone = await call(nc, "web_api_add", a=1, b=1)
        assert not gone.ok and gone.action == "error" and "web.api" in gone.text
        await wait_for_tools(nc, {"local_add", "late_add"}, absent={"web_api_add"})
        again = await call(nc, "web_api_add", a=1, b=1)
        assert not again.ok and "not connected" in again.text
        assert proc.alive()
    finally:
        await nc.close()

    # A clean stop ends the stdio server's process too.
    stdio_pid = int(pidfile.read_text())
    assert pid_alive(stdio_pid)
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(20) == 0
    deadline = time.monotonic() + 5
    while pid_alive(stdio_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not pid_alive(stdio_pid), "the stdio MCP server outlived the tools worker"
