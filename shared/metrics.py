"""Prometheus ``/metrics`` and a ``/healthz`` endpoint, served by every service."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

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
SLOW_CONSUMERS = Counter(
    "xz_nats_slow_consumers_total",
    "Times a subscription of this service fell so far behind that NATS messages were dropped",
    ["service"],
)
QUEUE_DEPTH = Gauge(
    "xz_queue_depth",
    "Messages waiting to be handled, by queue (NATS subscriptions by subject kind, and in-process queues)",
    ["service", "queue"],
)

# Buckets for per-frame latencies: 0.5 ms to 1 s.
FRAME_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)


def histogram(name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
    return Histogram(name, doc, labels, buckets=buckets)


def subscription_depths(nc: Any, prefix: str) -> dict[str, int]:
    """Messages waiting in this client's NATS subscriptions, summed by subject kind.

    ``xz.audio.<session>`` and ``xz.audio.*`` both count as ``audio``: the session id never
    becomes a label.
    """
    depths: dict[str, int] = {}
    for sub in list(getattr(nc, "_subs", {}).values()):
        subject = getattr(sub, "subject", "") or ""
        tokens = subject.split(".")
        if tokens and tokens[0] == prefix and len(tokens) > 1:
            kind = tokens[1]
        elif subject.startswith("_INBOX"):
            kind = "inbox"
        else:
            kind = "other"
        try:
            pending = int(sub.pending_msgs)
        except Exception:  # noqa: BLE001 - a subscription closing under us
            continue
        depths[kind] = depths.get(kind, 0) + pending
    return depths


async def watch_queues(service: str, nc: Any, prefix: str, extra: Callable[[], dict[str, int]] | None = None, every_s: float = 1.0) -> None:
    """Keep ``xz_queue_depth`` current for this process until cancelled."""
    seen: set[str] = set()
    while True:
        depths = subscription_depths(nc, prefix)
        if extra is not None:
            try:
                depths.update(extra())
            except Exception:  # noqa: BLE001
                log.debug("queue depth callback failed", exc_info=True)
        for kind in seen - depths.keys():
            QUEUE_DEPTH.labels(service, kind).set(0)
        for kind, depth in depths.items():
            QUEUE_DEPTH.labels(service, kind).set(depth)
        seen |= depths.keys()
        await asyncio.sleep(every_s)


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
