"""Live configuration: each bound device's agent, published to the ``xz_agents`` NATS KV bucket.

The services read a device's entry on every turn (``shared/agents.py``), so a change made here
applies to that device's next turn without a restart. The database is the source of truth: a
publish that fails (NATS down) is logged and counted, and a re-sync runs every
``manager.live_resync_s``: it writes only the entries that differ from what this process last
wrote, and everything when the buckets were lost or re-created (a NATS restart without its
store) or the last re-sync failed, so KV converges on the database at O(changes) writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from manager.models import Agent, Device
from shared.agents import AgentConfig, kv_key, legacy_kv_key, open_bucket
from shared.metrics import ERRORS

log = logging.getLogger("manager.live")


def agent_config(agent: Agent) -> AgentConfig:
    return AgentConfig(
        agent_id=str(agent.id),
        name=agent.name,
        role_prompt=agent.role_prompt or None,
        voice=agent.voice or None,
        tts_engine=agent.tts_engine or None,
        language=agent.language or None,
        memory=agent.memory,  # type: ignore[arg-type]
        tools=agent.tools,
        wake_greeting=agent.wake_greeting or None,
        llm_model=agent.llm_model or None,
        llm_backend=agent.llm_backend or None,
        asr_model=agent.asr_model or None,
        asr_hotwords=list(agent.asr_hotwords or []),
        asr_corrections=dict(agent.asr_corrections or {}),
        timezone_offset_minutes=agent.timezone_offset_minutes,
    )


class Publisher:
    """Writes device entries to KV from the API's worker threads, on the service's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: Any, bucket: str, sessions: sessionmaker[Session], devices_bucket: str = "xz_devices", firmware_bucket: str = "xz_firmware", replicas: int = 1) -> None:
        self.loop = loop
        self.nc = nc
        self.bucket_name = bucket
        self.devices_bucket = devices_bucket
        self.firmware_bucket = firmware_bucket
        self.sessions = sessions
        self.replicas = replicas  # JetStream servers each bucket lives on (work.replicas)
        self.audio_bucket = "xz_audio"  # the ASR's kept utterances (set from Subjects by the service)
        self.memory_bucket = "xz_memory"  # the LLM stage's per-device memory (likewise)
        self.unbind_subject = "xz.gateway.unbind"  # every gateway drops an unbound device's binding
        self.kv: Any = None
        self.flags: Any = None
        self.obs: Any = None
        # What this process last wrote ("a:"/"f:" + key -> value; None: deleted), and when the
        # buckets' streams were created: a change there means the KV was lost and is rewritten.
        self._published: dict[str, bytes | None] = {}
        self._created: list[Any] | None = None
        self._full_next = True

    async def open(self) -> None:
        self.kv = await open_bucket(self.nc, self.bucket_name, self.replicas)
        self.flags = await open_bucket(self.nc, self.devices_bucket, self.replicas)

    async def _object_store(self) -> Any:
        if self.obs is None:
            js = self.nc.jetstream()
            try:
                self.obs = await js.object_store(self.firmware_bucket)
            except Exception:  # noqa: BLE001 - not there yet
                from nats.js.api import ObjectStoreConfig

                self.obs = await js.create_object_store(self.firmware_bucket, config=ObjectStoreConfig(bucket=self.firmware_bucket, replicas=self.replicas))
        return self.obs

    # -- firmware images and device flags (from API threads) ---------------------------------
    def put_firmware(self, name: str, data: bytes) -> None:
        """Store an image (raises when NATS cannot take it: the upload then fails)."""

        async def put() -> None:
            await (await self._object_store()).put(name, data)

        asyncio.run_coroutine_threadsafe(put(), self.loop).result(timeout=60)

    def delete_firmware(self, name: str) -> None:
        async def delete() -> None:
            try:
                await (await self._object_store()).delete(name)
            except Exception as exc:  # noqa: BLE001 - already gone
                log.info("firmware object not deleted: %s", exc)

        asyncio.run_coroutine_threadsafe(delete(), self.loop).result(timeout=30)

    def get_audio(self, name: str) -> bytes | None:
        """An utterance kept by the ASR (object store xz_audio); None when gone (expired)."""

        async def get() -> bytes | None:
            try:
                store = await self.nc.jetstream().object_store(self.audio_bucket)
                return (await store.get(name)).data
            except Exception as exc:  # noqa: BLE001 - no store, no object
                log.info("audio %s not available: %s", name, exc)
                return None

        return asyncio.run_coroutine_threadsafe(get(), self.loop).result(timeout=30)

    def delete_audio(self, names: list[str]) -> None:
        async def delete() -> None:
            try:
                store = await self.nc.jetstream().object_store(self.audio_bucket)
            except Exception:  # noqa: BLE001 - nothing kept
                return
            for name in names:
                try:
                    await store.delete(name)
                except Exception:  # noqa: BLE001 - expired already
                    pass

        try:
            asyncio.run_coroutine_threadsafe(delete(), self.loop).result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - they expire by themselves
            log.info("kept audio not deleted (it expires): %s", exc)

    def device_flags(self, device_id: str, auto_upgrade: bool | None) -> bool:
        """The gateways' per-device flags (None: the device is gone, remove them)."""
        return self._call(lambda: self._put_flags([(device_id, auto_upgrade)]))

    async def _put_flags(self, items: list[tuple[str, bool | None]]) -> None:
        if self.flags is None:
            self.flags = await open_bucket(self.nc, self.devices_bucket, self.replicas)
        if self.flags is None:
            raise RuntimeError("no KV bucket (JetStream unavailable)")
        for device_id, auto_upgrade in items:
            key = kv_key(device_id)
            if auto_upgrade is None:
                try:
                    await self.flags.delete(key)
                except Exception:  # noqa: BLE001
                    pass
            else:
                await self.flags.put(key, _flags_value(auto_upgrade))  # type: ignore[arg-type]
            self._published["f:" + key] = _flags_value(auto_upgrade)

    # -- called from API threads -------------------------------------------------------------
    def device_changed(self, device_id: str, agent: Agent | None) -> bool:
        """Publish one device's entry (None: remove it, the default agent applies)."""
        return self._call(lambda: self._put(device_id, agent_config(agent) if agent else None))

    def agent_changed(self, agent: Agent, device_ids: list[str]) -> bool:
        config = agent_config(agent)
        return self._call(lambda: self._put_many([(d, config) for d in device_ids]))

    def devices_removed(self, device_ids: list[str]) -> bool:
        async def remove() -> None:
            await self._put_many([(d, None) for d in device_ids])
            await self._put_flags([(d, None) for d in device_ids])

        return self._call(remove)

    def devices_unbound(self, device_ids: list[str]) -> bool:
        """The devices are no one's any more: their live config goes, their memory is purged
        from ``<prefix>_memory``, and every gateway is told (subject ``<prefix>.gateway.unbind``,
        ``{"device_id", "stored": true}``: the binder has unbound it in the shared store) to
        close its sessions and refuse its tokens. Each step is tried even when another
        fails; False when any did (the re-sync repairs the live config; the others are logged
        and counted)."""

        async def unbind() -> None:
            failed: list[str] = []
            for device_id in device_ids:
                try:
                    await self.nc.publish(self.unbind_subject, json.dumps({"device_id": device_id, "stored": True}).encode())
                except Exception as exc:  # noqa: BLE001
                    failed.append(f"gateway unbind: {exc}")
            try:
                await self.nc.flush(timeout=5)
            except Exception as exc:  # noqa: BLE001
                failed.append(f"flush: {exc}")
            try:
                await self._purge_memory(device_ids)
            except Exception as exc:  # noqa: BLE001
                ERRORS.labels("manager", "memory_purge").inc()
                failed.append(f"memory: {exc}")
            try:
                await self._put_many([(d, None) for d in device_ids])
                await self._put_flags([(d, None) for d in device_ids])
            except Exception as exc:  # noqa: BLE001
                failed.append(f"live config: {exc}")
            if failed:
                raise RuntimeError("; ".join(failed))

        return self._call(unbind, timeout=15)

    async def _purge_memory(self, device_ids: list[str]) -> None:
        js = self.nc.jetstream()
        try:
            kv = await js.key_value(self.memory_bucket)
        except Exception:  # noqa: BLE001 - no bucket: nobody has memory yet
            return
        for device_id in device_ids:
            # The same key the LLM stage writes (shared.agents.kv_key); purge removes every
            # revision, not only the latest. The key of the earlier, colliding scheme goes too:
            # nothing reads it any more, but it may still hold this device's old memory.
            for key in (kv_key(device_id), legacy_kv_key(device_id)):
                if key is None:
                    continue
                try:
                    await kv.purge(key)
                except Exception as exc:  # noqa: BLE001
                    if "not found" not in str(exc).lower():
                        raise

    def _call(self, make: Callable[[], Any], timeout: float = 5) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout=timeout)
            return True
        except Exception as exc:  # noqa: BLE001 - the periodic re-sync repairs it
            ERRORS.labels("manager", "kv_publish").inc()
            log.warning("could not publish live config (re-sync will retry): %s", exc)
            return False

    # -- on the loop ---------------------------------------------------------------------------
    async def _put(self, device_id: str, config: AgentConfig | None) -> None:
        await self._put_many([(device_id, config)])

    async def _put_many(self, items: list[tuple[str, AgentConfig | None]]) -> None:
        if self.kv is None:
            await self.open()
        if self.kv is None:
            raise RuntimeError("no KV bucket (JetStream unavailable)")
        for device_id, config in items:
            key = kv_key(device_id)
            if config is None:
                try:
                    await self.kv.delete(key)
                except Exception:  # noqa: BLE001 - nothing to delete
                    pass
                self._published["a:" + key] = None
            else:
                value = config.encode()
                await self.kv.put(key, value)
                self._published["a:" + key] = value

    async def _buckets_recreated(self) -> bool:
        """Whether the KV buckets' streams are not the ones this process last wrote to."""
        js = self.nc.jetstream()
        created = [(await js.stream_info(f"KV_{name}")).created for name in (self.bucket_name, self.devices_bucket)]
        changed = created != self._created
        self._created = created
        return changed

    async def resync(self) -> int:
        """Publish the bound devices' entries from the database that KV lacks; returns how many
        entries were written (all of them on a full re-sync)."""

        def load() -> tuple[list[tuple[str, AgentConfig | None]], list[tuple[str, bool | None]]]:
            with self.sessions() as db:
                rows = db.execute(select(Device)).scalars().all()
                return [(d.device_id, agent_config(d.agent) if d.agent else None) for d in rows], [(d.device_id, d.auto_upgrade) for d in rows]

        items, flags = await asyncio.to_thread(load)
        full = self._full_next
        self._full_next = True  # until this one succeeds
        if self.kv is None or self.flags is None:
            await self.open()
        try:
            full = await self._buckets_recreated() or full
        except Exception:  # noqa: BLE001 - a bucket is gone: make it again, then write everything
            await self.open()
            await self._buckets_recreated()
            full = True
        if full:
            self._published.clear()
        else:
            items = [(d, c) for d, c in items if self._published.get("a:" + kv_key(d), None) != (c.encode() if c else None)]
            flags = [(d, f) for d, f in flags if self._published.get("f:" + kv_key(d), None) != _flags_value(f)]
        await self._put_many(items)
        await self._put_flags(flags)
        self._full_next = False
        return len(items) + len(flags)

    async def run_resync(self, every_s: float) -> None:
        while True:
            try:
                count = await self.resync()
                if count:
                    log.info("live config re-synced", extra={"fields": {"entries": count}})
            except Exception as exc:  # noqa: BLE001
                ERRORS.labels("manager", "kv_resync").inc()
                log.warning("live config re-sync failed: %s", exc)
                self.kv = self.flags = None  # reopen (and re-create) them next time
            await asyncio.sleep(every_s)


def _flags_value(auto_upgrade: bool | None) -> bytes | None:
    return None if auto_upgrade is None else json.dumps({"auto_upgrade": auto_upgrade}).encode()
