"""Per-device agent configuration (role, voice, memory, tools), kept in the ``xz_agents`` KV bucket.

The manager writes one entry per device (key: the device id made KV-safe) and a ``default``
entry; services read the entry on every turn, so a change applies to the next turn without a
restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Literal

from pydantic import BaseModel

log = logging.getLogger("shared.agents")

_KEY_UNSAFE = re.compile(r"[^-_=.a-zA-Z0-9]")
DEFAULT_KEY = "default"


def kv_key(device_id: str) -> str:
    """A KV key for a device id: a0:b1:c2:d3:e4:f5 -> a0_b1_c2_d3_e4_f5."""
    return _KEY_UNSAFE.sub("_", device_id.lower()) or "_"


class AgentConfig(BaseModel):
    """What a device's assistant is: persona, voice, memory and tools."""

    model_config = {"extra": "ignore"}

    # Which agent this is; devices that share an agent share its bridges' tools (MCP endpoint
    # tokens map to an agent id).
    agent_id: str = "default"
    name: str = "Xiaozhi"
    role_prompt: str | None = None  # None: the LLM stage's configured system prompt
    voice: str | None = None  # a Piper voice path; None: the TTS default
    language: str | None = None  # e.g. "en", "zh"; None: the ASR's language
    memory: Literal["none", "short", "summary"] = "short"
    # Server tools this agent may use (None: all). Device tools are always the device's own.
    tools: list[str] | None = None
    wake_greeting: str | None = None
    # The model to ask an OpenAI-compatible LLM server for (vLLM serving several); None: the
    # LLM stage's configured model. The embedded llama.cpp has one model and ignores it.
    llm_model: str | None = None
    # Which LLM backend answers: a name from the LLM stage's `llm.providers`; None: its default.
    llm_backend: str | None = None
    # Which Whisper model transcribes: one of the ASR stage's `asr.models`; None: `asr.model`.
    asr_model: str | None = None

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


async def open_bucket(nc: Any, bucket: str, replicas: int = 1) -> Any:
    """The KV bucket, created when missing (on ``replicas`` JetStream servers, as the work
    queues: ``work.replicas``); None when JetStream is not available."""
    from nats.js.api import KeyValueConfig

    js = nc.jetstream()
    try:
        return await js.key_value(bucket)
    except Exception:  # noqa: BLE001 - missing bucket: create it (where this user may)
        try:
            # `xiaozhi nats-setup` makes it as the admin; a service user may not, and its
            # refused request gets no answer: do not wait long for one.
            return await asyncio.wait_for(js.create_key_value(config=KeyValueConfig(bucket=bucket, history=1, replicas=replicas)), 2.0)
        except asyncio.TimeoutError:
            log.warning("KV bucket %s is missing and this NATS user may not create it (run `xiaozhi nats-setup` as the admin user); trying again later", bucket)
            return None
        except Exception as exc:  # noqa: BLE001
            log.warning("no JetStream KV bucket %s: %s", bucket, exc)
            return None


async def load_agent(kv: Any, device_id: str) -> AgentConfig:
    """The device's agent, else the default agent, else built-in defaults."""
    if kv is None:
        return AgentConfig()
    for key in (kv_key(device_id) if device_id else None, DEFAULT_KEY):
        if not key:
            continue
        try:
            entry = await kv.get(key)
        except Exception:  # noqa: BLE001 - not found
            continue
        if entry is not None and entry.value:
            try:
                return AgentConfig.model_validate(json.loads(entry.value))
            except Exception as exc:  # noqa: BLE001
                log.warning("bad agent config under %s: %s", key, exc)
    return AgentConfig()


class AgentDirectory:
    """Devices' agents for a stage that must not wait on them (the ASR per utterance, the
    gateway's greeting): the bucket is looked up once and kept; None when there is no bucket
    yet (no manager), no entry, or NATS does not answer within ``timeout_s``."""

    def __init__(self, nc: Any, bucket: str, timeout_s: float = 0.5) -> None:
        self.nc = nc
        self.bucket = bucket
        self.timeout_s = timeout_s
        self._kv: Any = None

    async def get(self, device_id: str | None) -> AgentConfig | None:
        if not device_id:
            return None
        try:
            if self._kv is None:
                self._kv = await asyncio.wait_for(self.nc.jetstream().key_value(self.bucket), self.timeout_s)
            return await asyncio.wait_for(load_agent(self._kv, device_id), self.timeout_s)
        except Exception:  # noqa: BLE001 - no bucket, NATS down or slow: the defaults apply
            return None


async def save_agent(kv: Any, device_id: str | None, agent: AgentConfig) -> None:
    await kv.put(kv_key(device_id) if device_id else DEFAULT_KEY, agent.encode())
