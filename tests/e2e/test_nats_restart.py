"""The NATS server restarts under a live session: every service reconnects, the device's
socket stays open, and the next turn after NATS is back works.

A stack of its own: the nats-server is stopped and started again on the same port (and the
same JetStream store), as a pod restart would. The work queues live in memory, so they come
back empty and the workers make them again.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.conftest import fixture_wav
from xiaozhi.sim import SimDevice, read_wav
from xiaozhi.stack import SERVICES, Stack, free_port, healthy

pytestmark = pytest.mark.e2e


def all_healthy(procs) -> bool:
    return all(healthy(p.metrics_port) for p in procs)


async def test_services_and_devices_ride_out_a_nats_restart(tmp_path):
    stack = Stack(env={"XZ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", "XZ_GATEWAY__HOST": "127.0.0.1", "XZ_GATEWAY__BINDING_DB": str(tmp_path / "b.sqlite")}, log_dir=tmp_path / "logs")
    nats_port = free_port()
    store = str(tmp_path / "js")
    try:
        stack.start_nats(nats_port, "127.0.0.1", store)
        ws_port = free_port()
        gateway_env = {"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(free_port())}
        procs = [stack.start_service(name, free_port(), gateway_env if name == "gateway" else None) for name in SERVICES]
        stack.wait_healthy(procs, timeout=240)
        async with SimDevice(ws_url=f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/") as device:
            before = await device.type_text("What time is it?")
            assert before.error is None and before.frames > 0, before

            nats = next(p for p in stack.procs if p.name == "nats")
            nats.popen.send_signal(signal.SIGKILL)
            nats.popen.wait(10)
            stack.procs.remove(nats)
            await asyncio.sleep(3)
            # NATS is gone: services say so, the device stays connected.
            assert not all_healthy(procs)
            assert not device.closed
            stack.start_nats(nats_port, "127.0.0.1", store)
            deadline = time.monotonic() + 30
            while not all_healthy(procs):
                assert time.monotonic() < deadline, "services did not reconnect"
                await asyncio.sleep(0.3)
            assert all(p.alive() for p in procs)
            assert not device.closed

            # The next turns work: typed, and spoken (VAD, ASR, LLM, TTS all back on the bus).
            after = await device.type_text("What time is it?", reply_timeout=30)
            assert after.error is None and after.frames > 0, (after, (tmp_path / "logs" / "gateway.log").read_text()[-3000:])
            await device.listen_start("auto")
            spoken = await device.speak(read_wav(fixture_wav("en_what_time.wav")), reply_timeout=30)
            assert spoken.error is None and spoken.stt and "time" in spoken.stt.lower(), spoken
            assert spoken.frames > 0
    finally:
        stack.stop()
