"""Prometheus ``/metrics`` and a ``/healthz`` endpoint, served by every service."""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("shared.metrics")

HealthCheck = Callable[[], Awaitable[dict] | dict]

# Buckets for latencies of a voice pipeline: 5 ms to 30 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30)

# Counters every service shares.
DROPPED = Counter(
    "xz_dropped_total", "Messages or frames dropped, by reason", ["service", "reason"]
)
ERRORS = Counter("xz_errors_total", "Errors handled without crashing, by kind", ["service", "kind"])
NATS_CONNECTED = Gauge("xz_nats_connected", "1 while the NATS connection is up", ["service"])


def histogram(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS)


async def start_server(
    host: str, port: int, health: HealthCheck
) -> tuple[web.AppRunner, int]:
    """Serve ``/metrics`` and ``/healthz``; return the runner and the bound port."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        result = health()
        if hasattr(result, "__await__"):
            result = await result  # type: ignore[misc]
        ok = bool(result.get("ok", False))
        return web.Response(
            status=200 if ok else 503, text=json.dumps(result), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound
