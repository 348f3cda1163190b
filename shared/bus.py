"""NATS connection helper: reconnect for ever, log what happens, drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import ssl

from nats.aio.client import Client as NATS
from nats.errors import SlowConsumerError

from shared.metrics import NATS_CONNECTED, SLOW_CONSUMERS

from shared.logging import redact_url
from shared.settings import NatsSettings

log = logging.getLogger("shared.bus")


async def connect(settings: NatsSettings, name: str, *, retry_first: bool = True, service: str | None = None) -> NATS:
    """Connect to NATS with unlimited reconnects; wait for the first connection if asked.

    A service started before NATS (or while it restarts) keeps retrying instead of failing.
    """

    slow = {"count": 0}

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            # NATS dropped messages for a subscription that fell behind: count it, log it once
            # in a while rather than once per message.
            SLOW_CONSUMERS.labels(service or name).inc()
            slow["count"] += 1
            if slow["count"] == 1 or slow["count"] % 100 == 0:
                log.warning("slow consumer: messages dropped", extra={"fields": {"subject": getattr(exc, "subject", ""), "count": slow["count"]}})
            return
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        # The gauge follows the connection itself, not only /healthz polls (alerts use it).
        if service:
            NATS_CONNECTED.labels(service).set(0)
        log.warning("nats disconnected")

    async def on_reconnected() -> None:
        if service:
            NATS_CONNECTED.labels(service).set(1)
        log.info("nats reconnected", extra={"fields": {"url": redact_url(nc.connected_url.geturl()) if nc.connected_url else None}})

    async def on_closed() -> None:
        log.info("nats connection closed")

    nc = NATS()
    delay = 0.2
    auth: dict = {}
    if settings.user:
        from shared.natsauth import inbox_prefix

        auth["user"] = settings.user
        auth["password"] = settings.secret() or ""
        # Its own reply subjects: the user may subscribe to those only (shared/natsauth.py).
        auth["inbox_prefix"] = inbox_prefix(settings.user)
    tls = tls_context(settings)
    if tls is not None:
        auth["tls"] = tls
    while True:
        try:
            await nc.connect(
                **auth,
                servers=[u.strip() for u in settings.url.split(",") if u.strip()],
                name=name,
                connect_timeout=settings.connect_timeout_s,
                max_reconnect_attempts=settings.max_reconnect_attempts,
                reconnect_time_wait=settings.reconnect_wait_s,
                allow_reconnect=True,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
                # Large enough for an utterance of 30 s of Opus and more.
                pending_size=64 * 1024 * 1024,
            )
            log.info("nats connected", extra={"fields": {"url": redact_url(settings.url), "user": settings.user or None}})
            return nc
        except Exception as exc:  # noqa: BLE001 - any failure to connect is retried
            if not retry_first:
                raise
            log.warning("nats connect failed, retrying: %s", exc, extra={"fields": {"url": redact_url(settings.url)}})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """The TLS context for NATS, when asked for (``tls``, a CA file, or a ``tls://`` URL)."""
    if not (settings.tls or settings.tls_ca_file or settings.url.startswith("tls://")):
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca_file)
    if settings.tls_cert_file:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


async def drain(nc: NATS, timeout_s: float) -> None:
    """Finish in-flight messages, then close; never hang past ``timeout_s``."""
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout_s)
    except Exception as exc:  # noqa: BLE001
        log.warning("nats drain did not finish cleanly: %s", exc)
        try:
            await nc.close()
        except Exception:  # noqa: BLE001
            pass
