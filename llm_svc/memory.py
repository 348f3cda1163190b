"""Per-device memory in a JetStream key-value bucket (``xz_memory``).

Keyed on the Device-Id (protocol.md §9.19; ``shared.agents.kv_key``: a hash of the lower-cased
id, so ids that differ other than by case never share a memory; a reserved id, empty or
``default``, keeps none), so it survives reconnects and any LLM replica can
take any turn. Modes (from the device's agent): ``none`` keeps nothing; ``short`` keeps the
recent turns; ``summary`` also keeps a summary the model writes when a session ends, so older
conversations are remembered in a few sentences. Without JetStream it stays in this process.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import BaseModel, Field

from shared.agents import kv_key, open_bucket, reserved_device_id

log = logging.getLogger("llm_svc.memory")


class Memory(BaseModel):
    turns: list[dict[str, str]] = Field(default_factory=list)  # user/assistant messages
    summary: str = ""


class MemoryStore:
    def __init__(self, bucket: str, max_turns: int, replicas: int = 1) -> None:
        self.bucket = bucket
        self.replicas = replicas
        self.max_messages = max_turns * 2
        self._kv: Any = None
        self._local: dict[str, Memory] = {}
        self._nc: Any = None
        self._opened_at = 0.0

    async def open(self, nc: Any) -> None:
        self._nc = nc
        self._opened_at = time.monotonic()
        self._kv = await open_bucket(nc, self.bucket, self.replicas)
        if self._kv is None:
            log.warning("memory is kept in this process only until the bucket is there (no JetStream, or not made yet)")

    async def _reopen(self) -> None:
        """No bucket at start (not made yet by `xiaozhi nats-setup`): look again now and then."""
        if self._kv is None and self._nc is not None and time.monotonic() - self._opened_at > 10.0:
            self._opened_at = time.monotonic()
            self._kv = await open_bucket(self._nc, self.bucket, self.replicas)
            if self._kv is not None:
                log.info("memory bucket found", extra={"fields": {"bucket": self.bucket}})

    async def load(self, device_id: str) -> Memory:
        if reserved_device_id(device_id):
            return Memory()  # no id (or "default"): nothing is remembered, nothing shared
        await self._reopen()
        key = kv_key(device_id)
        if self._kv is None:
            return self._local.get(key, Memory()).model_copy(deep=True)
        try:
            entry = await self._kv.get(key)
            return Memory.model_validate(json.loads(entry.value)) if entry and entry.value else Memory()
        except Exception:  # noqa: BLE001 - not found, or unreadable: start afresh
            return Memory()

    async def save(self, device_id: str, memory: Memory) -> None:
        # (a plain [-0:] slice would keep everything)
        memory.turns = memory.turns[-self.max_messages :] if self.max_messages > 0 else []
        if reserved_device_id(device_id):
            return
        key = kv_key(device_id)
        if self._kv is None:
            self._local[key] = memory
            return
        try:
            await self._kv.put(key, memory.model_dump_json().encode())
        except Exception as exc:  # noqa: BLE001
            log.warning("memory not saved: %s", exc)

    async def add_turn(self, device_id: str, user: str, assistant: str) -> None:
        memory = await self.load(device_id)
        memory.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        await self.save(device_id, memory)

    async def forget(self, device_id: str) -> None:
        await self.save(device_id, Memory())
