"""Live configuration: each bound device's agent, published to the ``xz_agents`` NATS KV bucket.

The services read a device's entry on every turn (``shared/agents.py``), so a change made here
applies to that device's next turn without a restart. The database is the source of truth: a
publish that fails (NATS down) is logged and counted, and a full re-sync runs every
``resync_s`` and after every reconnect, so KV converges on the database.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from manager.models import Agent, Device
from shared.agents import AgentConfig, kv_key, open_bucket
from shared.metrics import ERRORS

log = logging.getLogger("manager.live")


def agent_config(agent: Agent) -> AgentConfig:
    return AgentConfig(
        agent_id=str(agent.id),
        name=agent.name,
        role_prompt=agent.role_prompt or None,
        voice=agent.voice or None,
        language=agent.language or None,
        memory=agent.memory,  # type: ignore[arg-type]
        tools=agent.tools,
        wake_greeting=agent.wake_greeting or None,
    )


class Publisher:
    """Writes device entries to KV from the API's worker threads, on the service's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, nc: Any, bucket: str, sessions: sessionmaker[Session]) -> None:
        self.loop = loop
        self.nc = nc
        self.bucket_name = bucket
        self.sessions = sessions
        self.kv: Any = None

    async def open(self) -> None:
        self.kv = await open_bucket(self.nc, self.bucket_name)

    # -- called from API threads -------------------------------------------------------------
    def device_changed(self, device_id: str, agent: Agent | None) -> bool:
        """Publish one device's entry (None: remove it, the default agent applies)."""
        return self._call(lambda: self._put(device_id, agent_config(agent) if agent else None))

    def agent_changed(self, agent: Agent, device_ids: list[str]) -> bool:
        config = agent_config(agent)
        return self._call(lambda: self._put_many([(d, config) for d in device_ids]))

    def devices_removed(self, device_ids: list[str]) -> bool:
        return self._call(lambda: self._put_many([(d, None) for d in device_ids]))

    def _call(self, make: Callable[[], Any]) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout=5)
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
            else:
                await self.kv.put(key, config.encode())

    async def resync(self) -> int:
        """Publish every bound device's entry from the database; returns how many."""

        def load() -> list[tuple[str, AgentConfig | None]]:
            with self.sessions() as db:
                rows = db.execute(select(Device)).scalars().all()
                return [(d.device_id, agent_config(d.agent) if d.agent else None) for d in rows]

        items = await asyncio.to_thread(load)
        await self._put_many(items)
        return len(items)

    async def run_resync(self, every_s: float) -> None:
        while True:
            try:
                count = await self.resync()
                log.debug("live config re-synced", extra={"fields": {"devices": count}})
            except Exception as exc:  # noqa: BLE001
                ERRORS.labels("manager", "kv_resync").inc()
                log.warning("live config re-sync failed: %s", exc)
            await asyncio.sleep(every_s)
