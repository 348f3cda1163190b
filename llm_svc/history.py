"""Short per-session conversation history, in a JetStream key-value bucket.

LLM workers are stateless between turns: any replica can take the next turn of a session,
so the history lives in NATS. Without JetStream it falls back to this process's memory.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from nats.aio.client import Client as NATS

log = logging.getLogger("llm_svc.history")

_KEY_OK = re.compile(r"[^-_=.a-zA-Z0-9]")


class HistoryStore:
    def __init__(self, bucket: str, max_turns: int, ttl_s: int) -> None:
        self.bucket = bucket
        self.max_messages = max_turns * 2
        self.ttl_s = ttl_s
        self._kv: Any = None
        self._local: dict[str, list[dict[str, str]]] = {}

    async def open(self, nc: NATS) -> None:
        from nats.js.api import KeyValueConfig

        js = nc.jetstream()
        try:
            self._kv = await js.create_key_value(config=KeyValueConfig(bucket=self.bucket, history=1, ttl=float(self.ttl_s)))
        except Exception:  # noqa: BLE001 - it may exist with another config already
            try:
                self._kv = await js.key_value(self.bucket)
            except Exception as exc:  # noqa: BLE001
                log.warning("no JetStream KV for history, keeping it in memory: %s", exc)
                self._kv = None

    @staticmethod
    def _key(session_id: str) -> str:
        return _KEY_OK.sub("_", session_id) or "_"

    async def load(self, session_id: str) -> list[dict[str, str]]:
        if self._kv is None:
            return list(self._local.get(session_id, []))
        try:
            entry = await self._kv.get(self._key(session_id))
            return json.loads(entry.value) if entry and entry.value else []
        except Exception:  # noqa: BLE001 - key not found or KV unavailable
            return []

    async def append(self, session_id: str, user: str, assistant: str) -> None:
        history = await self.load(session_id)
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        history = history[-self.max_messages :]
        if self._kv is None:
            self._local[session_id] = history
            return
        try:
            await self._kv.put(self._key(session_id), json.dumps(history, ensure_ascii=False).encode())
        except Exception as exc:  # noqa: BLE001
            log.warning("history not saved: %s", exc)
