"""A tools worker killed (`kill -9`) in the middle of a call: the LLM's tool client notices
the silence (workers send progress every second) and another replica answers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from nats.aio.client import Client as NATS

from llm_svc.tools import WORKER_SILENCE_S, ToolClient
from shared.subjects import Subjects
from xiaozhi import prom
from xiaozhi.stack import free_port

SERVER = str(Path(__file__).parents[1] / "fixtures" / "mcp_server.py")


def in_flight(port: int) -> float:
    return prom.value(prom.scrape(port), "xz_tools_in_flight")


async def test_call_survives_the_death_of_its_tools_worker(nats_only):
    env = {"XZ_TOOLS__MCP_SERVERS": json.dumps({"demo": {"command": sys.executable, "args": [SERVER]}}), "XZ_LOG_JSON": "true"}
    workers = [nats_only.start_service("tools", free_port(), env) for _ in range(2)]
    nats_only.wait_healthy(workers)
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        client = ToolClient(nc, Subjects(), timeout_s=36)
        deadline = time.monotonic() + 20
        while "demo_slow_echo" not in {t.name for t in await client.list()}:
            assert time.monotonic() < deadline, "the MCP fixture's tools never showed up"
            await asyncio.sleep(0.3)
        # Both replicas must have the MCP server connected before the call.
        await asyncio.sleep(1.0)

        # A slow tool (4 s) is a live call, not a dead worker: it answers, progress keeps it alive.
        result = await client.call("demo_slow_echo", json.dumps({"text": "patience", "seconds": 4}), "s1", "t1", "d1")
        assert result.ok and "patience" in result.text, result

        call = asyncio.create_task(client.call("demo_slow_echo", json.dumps({"text": "again", "seconds": 3}), "s1", "t2", "d1"))
        holder = None
        deadline = time.monotonic() + 10
        while holder is None:
            assert time.monotonic() < deadline, "no worker took the call"
            for worker in workers:
                if in_flight(worker.metrics_port) >= 1:
                    holder = worker
            await asyncio.sleep(0.05)
        holder.popen.send_signal(signal.SIGKILL)
        holder.popen.wait(5)
        killed_at = time.monotonic()
        result = await call
        took = time.monotonic() - killed_at
        assert result.ok and "again" in result.text, result
        # Silence noticed, then the survivor runs the whole 3 s call again.
        assert took < WORKER_SILENCE_S + 3 + 3, took

        # With no worker left the call fails fast and says so, rather than hanging 36 s.
        survivor = next(w for w in workers if w is not holder)
        survivor.popen.send_signal(signal.SIGKILL)
        survivor.popen.wait(5)
        started = time.monotonic()
        result = await client.call("demo_slow_echo", json.dumps({"text": "x", "seconds": 1}), "s1", "t3", "d1")
        assert not result.ok and "no tools worker" in result.text, result
        assert time.monotonic() - started < 5
    finally:
        await nc.close()
