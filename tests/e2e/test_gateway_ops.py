"""Operating a gateway: admission control, rate limits, and a SIGTERM that lets replies finish.

Each test starts a gateway process of its own (with the settings under test) on the shared
pipeline's NATS, and talks to it as the firmware does.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import start_gateway
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

SLOW_DOWN = "You're talking faster than I can keep up. Please wait a moment."


async def connect(url: str) -> SimDevice:
    device = SimDevice(ws_url=url)
    await device.connect()
    return device


def status_of(exc: InvalidStatus) -> int:
    return exc.response.status_code


async def test_admission_control_caps_sessions(pipeline):
    gateway = start_gateway(pipeline.stack, max_sessions="2")
    try:
        first, second = await connect(gateway.ws_url), await connect(gateway.ws_url)
        with pytest.raises(InvalidStatus) as refused:
            await connect(gateway.ws_url)
        assert status_of(refused.value) == 503
        await first.close()
        await asyncio.sleep(0.5)
        third = await connect(gateway.ws_url)  # room again
        # The devices inside are served normally.
        report = await second.type_text("What time is it?")
        assert report.error is None and report.frames > 0, report
        await asyncio.gather(second.close(), third.close())
    finally:
        gateway.stop()


async def test_connection_rate_limit_per_address(pipeline):
    gateway = start_gateway(pipeline.stack, rate_limits__connections_per_minute_per_ip="3")
    try:
        devices = [await connect(gateway.ws_url) for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await connect(gateway.ws_url)
        assert status_of(refused.value) == 429
        await asyncio.gather(*(d.close() for d in devices))
    finally:
        gateway.stop()


async def test_turn_rate_limit_says_slow_down_and_recovers(pipeline):
    gateway = start_gateway(pipeline.stack, rate_limits__turns_per_minute_per_device="60", rate_limits__cooldown_s="2")
    # 60 a minute is one a second with a burst of 60: spend the burst quickly with typed text.
    gateway2 = None
    try:
        async with SimDevice(ws_url=gateway.ws_url) as device:
            first = await device.type_text("What time is it?")
            assert first.error is None and first.frames > 0, first
        gateway.stop()
        gateway2 = start_gateway(pipeline.stack, rate_limits__turns_per_minute_per_device="1", rate_limits__cooldown_s="2")
        async with SimDevice(ws_url=gateway2.ws_url) as device:
            answered = await device.type_text("What time is it?")
            assert answered.error is None and answered.stt, answered
            limited = await device.type_text("What time is it now?")
            assert limited.error is None, limited
            assert limited.sentences == [SLOW_DOWN], limited.sentences
            assert limited.stt is None
    finally:
        if gateway2 is not None:
            gateway2.stop()


async def test_sigterm_lets_the_reply_finish_then_sends_devices_elsewhere(pipeline):
    gateway = start_gateway(pipeline.stack)
    try:
        async with SimDevice(ws_url=gateway.ws_url) as device:
            mark = len(device.received)
            turn = asyncio.create_task(device.type_text("Tell me a short joke."))
            assert await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
            gateway.proc.popen.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            sent_at = time.monotonic()
            # Not ready any more: the load balancer stops sending devices here...
            await asyncio.sleep(0.3)
            with pytest.raises(urllib.error.HTTPError) as health:
                urllib.request.urlopen(f"http://127.0.0.1:{gateway.proc.metrics_port}/healthz", timeout=2)  # type: ignore[attr-defined]
            assert health.value.code == 503
            # ...and new connections are refused...
            with pytest.raises((InvalidStatus, OSError)):
                await connect(gateway.ws_url)
            # ...while the reply in flight plays to its end.
            report = await turn
            assert report.error is None and report.stopped, report
            assert report.audio_s >= 1.0
            # Then the session is closed with 1001 (going away) and the process exits.
            deadline = time.monotonic() + 10
            while not device.closed and device.ws.close_code is None:
                assert time.monotonic() < deadline, "the drained session was not closed"
                await asyncio.sleep(0.1)
            assert device.ws.close_code == 1001
        assert gateway.proc.popen.wait(30) == 0  # type: ignore[attr-defined]
        assert time.monotonic() - sent_at < 25
        # The device goes idle; its next wake word connects, through the load balancer, to another replica.
        async with SimDevice(ws_url=pipeline.ws_url) as device:
            report = await device.type_text("What time is it?")
            assert report.error is None and report.frames > 0, report
    finally:
        if gateway.proc.popen.poll() is None:  # type: ignore[attr-defined]
            gateway.stop()
