"""The common lifecycle of a service process: settings, logging, NATS, metrics, signals.

A service is an object with ``start(nc)``, ``stop()`` and ``health()``; :func:`run` wires it
up, serves ``/metrics`` and ``/healthz``, and on SIGTERM/SIGINT stops taking work, drains NATS
and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Callable, Protocol

from nats.aio.client import Client as NATS

from shared import bus, metrics, workqueue
from shared import logging as xlog
from shared.settings import Settings, load_settings
from shared.subjects import Subjects

log = logging.getLogger("shared.service")


class Service(Protocol):
    """What :func:`run` needs from a service."""

    name: str

    async def start(self, nc: NATS) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


def parse_args(name: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"xiaozhi run {name}", description=f"Run the {name} service.")
    parser.add_argument("--config", help="YAML settings file (default: $XZ_CONFIG)")
    parser.add_argument("--nats", help="NATS URL (overrides settings)")
    parser.add_argument("--metrics-port", type=int, help="port for /metrics and /healthz (0: any free)")
    return parser.parse_args(argv)


def cli_settings(name: str, config: str | None, nats: str | None) -> Settings | None:
    """A command's settings (``--config``, ``--nats``) with logging set up; None (said on
    stderr) when they do not load."""
    try:
        settings = load_settings(config)
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: bad settings: {exc}", file=sys.stderr)
        return None
    if nats:
        settings.nats.url = nats
    xlog.setup(name, settings.log_level, settings.log_json)
    return settings


def run(name: str, factory: Callable[[Settings], Service], metrics_port: Callable[[Settings], int], argv: list[str] | None = None) -> int:
    """Run a service until SIGTERM/SIGINT. Returns the process exit code."""
    args = parse_args(name, argv)
    settings = cli_settings(name, args.config, args.nats)
    if settings is None:
        return 2
    port = args.metrics_port if args.metrics_port is not None else metrics_port(settings)
    try:
        return asyncio.run(_serve(name, settings, factory, port))
    except KeyboardInterrupt:
        return 0


async def _serve(name: str, settings: Settings, factory: Callable[[Settings], Service], port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    log.info("starting", extra={"fields": {"pid": os.getpid()}})
    service = await asyncio.to_thread(factory, settings)
    nc = await bus.connect(settings.nats, name=f"{name}-{os.getpid()}", service=name)
    metrics.NATS_CONNECTED.labels(name).set(1)

    def health() -> dict[str, Any]:
        state = service.health()
        connected = nc.is_connected
        metrics.NATS_CONNECTED.labels(name).set(1 if connected else 0)
        state.setdefault("ok", True)
        state["ok"] = bool(state["ok"] and connected)
        state["nats"] = "connected" if connected else ("reconnecting" if nc.is_reconnecting else "down")
        state["service"] = name
        return state

    # Every stage's work queue exists before anyone publishes to it, whoever starts first.
    for stage in workqueue.STAGES:
        try:
            await workqueue.ensure_stream(nc, Subjects(settings.nats.prefix), stage, settings.work)
        except workqueue.NotAllowed as exc:
            # Made by `xiaozhi nats-setup`; the stage's workers keep trying until it is there.
            log.error("%s; waiting for it", exc)
        except Exception as exc:  # noqa: BLE001
            log.error("cannot create the %s work queue (is JetStream enabled on the NATS server?): %s", stage, exc)
    await service.start(nc)
    extra = getattr(service, "queue_depths", None)
    watcher = asyncio.create_task(metrics.watch_queues(name, nc, settings.nats.prefix, extra))
    runner, bound = await metrics.start_server(settings.metrics_host, port, health)
    log.info("ready", extra={"fields": {"metrics_port": bound}})
    await stop.wait()
    log.info("stopping")
    watcher.cancel()
    try:
        # A service may need longer to stop than NATS to drain (the gateway lets replies finish).
        await asyncio.wait_for(service.stop(), getattr(service, "stop_timeout_s", settings.nats.drain_timeout_s))
    except Exception as exc:  # noqa: BLE001
        log.warning("service stop failed: %s", exc)
    await bus.drain(nc, settings.nats.drain_timeout_s)
    await runner.cleanup()
    log.info("stopped")
    return 0
