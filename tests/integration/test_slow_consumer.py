"""A subscription that falls behind: NATS drops its messages, and the service counts it."""

from __future__ import annotations

import asyncio

from shared import bus
from prometheus_client import REGISTRY
from shared.settings import NatsSettings


async def test_slow_consumers_are_counted(nats_only):
    nc = await bus.connect(NatsSettings(url=nats_only.nats_url), name="slow-test", service="slowtest")
    try:
        def counted() -> float:
            return REGISTRY.get_sample_value("xz_nats_slow_consumers_total", {"service": "slowtest"}) or 0.0

        before = counted()

        async def slow(_msg) -> None:
            await asyncio.sleep(0.05)

        await nc.subscribe("xz.test.slow", cb=slow, pending_msgs_limit=5)
        for i in range(200):
            await nc.publish("xz.test.slow", b"x")
        await nc.flush()
        await asyncio.sleep(0.5)
        dropped = counted() - before
        assert dropped >= 100, dropped
        assert nc.is_connected  # counted, not fatal
    finally:
        await nc.close()
