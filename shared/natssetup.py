"""Make every stream, KV bucket and object store the stack uses, as the NATS ``admin`` user.

The service users may not create or change streams (:mod:`shared.natsauth`): a compromised
service could otherwise make a stream that captures subjects it may not subscribe to,
``republish`` into subjects it may not publish to, or shrink another stage's queue. So one
step with the admin identity makes them all, with the settings' limits and replicas, before the
services start: ``xiaozhi nats-setup`` (run by ``xiaozhi up``, compose's one-shot
``nats-setup`` service and the Kubernetes Job ``nats-setup``). It is idempotent: what exists is
kept (work queues are brought to the settings' limits).

The services still create what is missing themselves where their user may (a NATS server
without users, as in most tests); where they may not, they log it and wait for this step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from shared import bindings, workqueue
from shared.settings import Settings
from shared.subjects import Subjects

log = logging.getLogger("shared.natssetup")


def buckets(settings: Settings) -> list[str]:
    """The KV buckets: agents (manager -> services), device flags (manager -> gateways),
    memory (LLM)."""
    s = Subjects(settings.nats.prefix)
    return [s.kv_agents, s.kv_devices, s.kv_memory]


def object_stores(settings: Settings) -> list[tuple[str, float | None]]:
    """The object stores and their TTL: firmware images (manager), kept utterances (ASR)."""
    s = Subjects(settings.nats.prefix)
    return [(s.obj_firmware, None), (s.obj_audio, settings.asr.keep_audio_days * 86400)]


async def setup(nc: Any, settings: Settings) -> list[str]:
    """Make what is missing; returns the names of the streams now in place."""
    from nats.js.api import KeyValueConfig, ObjectStoreConfig
    from nats.js.errors import BucketNotFoundError, NotFoundError

    subjects = Subjects(settings.nats.prefix)
    replicas = settings.work.replicas
    js = nc.jetstream()
    names = []
    for stage in workqueue.STAGES:
        names.append(await workqueue.ensure_stream(nc, subjects, stage, settings.work, update=True))
    for bucket in buckets(settings):
        try:
            await js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            await js.create_key_value(config=KeyValueConfig(bucket=bucket, history=1, replicas=replicas))
            log.info("KV bucket created", extra={"fields": {"bucket": bucket, "replicas": replicas}})
        names.append(f"KV_{bucket}")
    await bindings.ensure_buckets(nc, settings.nats.prefix, settings.gateway.code_ttl_s, settings.gateway.max_pending_codes, replicas)
    names += [f"KV_{b}" for b in bindings.bucket_names(settings.nats.prefix)]
    for store, ttl in object_stores(settings):
        try:
            await js.object_store(store)
        except (BucketNotFoundError, NotFoundError):
            await js.create_object_store(store, config=ObjectStoreConfig(bucket=store, ttl=ttl, replicas=replicas))
            log.info("object store created", extra={"fields": {"bucket": store, "replicas": replicas}})
        names.append(f"OBJ_{store}")
    return names


async def setup_until_done(settings: Settings, timeout_s: float = 120.0, name: str = "nats-setup") -> list[str]:
    """Connect (as ``settings.nats`` says: the admin user) and run :func:`setup`, retrying while
    NATS or JetStream is not ready yet (a cluster electing its leader), up to ``timeout_s``."""
    from shared import bus

    deadline = time.monotonic() + timeout_s
    nc = await asyncio.wait_for(bus.connect(settings.nats, name=name), timeout_s)
    try:
        delay = 0.5
        while True:
            try:
                return await setup(nc, settings)
            except Exception as exc:  # noqa: BLE001 - JetStream not ready, leader election...
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("NATS setup not done yet, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
    finally:
        await nc.close()
