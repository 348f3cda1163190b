"""Per-device agent configuration (role, voice, memory, tools), kept in the ``xz_agents`` KV bucket.

The manager writes one entry per device (key: ``kv_key(device_id)``) and a ``default`` entry;
services read the entry on every turn, so a change applies to the next turn without a restart.

Keys: ``dev.`` + the SHA-256 of the device id, after lower-casing it and nothing else. The
firmware sends its MAC in lower case and the manager and the gateway's binding store keep device
ids lower-cased, so ``AA:BB:..`` and ``aa:bb:..`` are one device everywhere; any other
difference (``aa:bb`` against ``aa_bb``) makes another key. A device key never equals
``default`` (the deployment's default agent), and ids that would mean it (``default``, empty) are
refused where agents are written (``reserved_device_id``).

Upgrading from the earlier scheme (lower-cased, other characters mapped to ``_``, which let
``aa:aa:..`` and ``aa_aa_..`` share a key and a device called ``DEFAULT`` replace the default
agent): entries under the old keys are no longer read. The manager re-publishes every bound
device's agent at start, so agents carry over; a device's memory (``xz_memory``) under an old key
is lost (not read through the colliding scheme), and the old entries stay in the buckets unused
until deleted (``legacy_kv_key`` names them, for deleting only).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from typing import Any, Literal

from pydantic import BaseModel, Field

log = logging.getLogger("shared.agents")

DEFAULT_KEY = "default"
DEVICE_KEY_PREFIX = "dev."
# Ids that may not have an agent or memory of their own: they would mean (or be confused with)
# the deployment's default agent.
RESERVED_DEVICE_IDS = frozenset({"", "default"})


def normalize_device_id(device_id: str) -> str:
    """The one case-folding that is safe: devices' ids are MACs or UUIDs, sent in lower case by
    the firmware and kept lower-cased by the manager; nothing else is changed."""
    return device_id.lower()


def reserved_device_id(device_id: str | None) -> bool:
    """Whether ``device_id`` may not have an agent entry (empty, blank or ``default``)."""
    return device_id is None or normalize_device_id(device_id).strip() in RESERVED_DEVICE_IDS


def kv_key(device_id: str) -> str:
    """The KV key of a device id (agents, memory, device flags): ``dev.`` + SHA-256 of the
    lower-cased id; collision-free, always a valid key, never ``default``."""
    return DEVICE_KEY_PREFIX + hashlib.sha256(normalize_device_id(device_id).encode("utf-8", "surrogatepass")).hexdigest()


def legacy_kv_key(device_id: str) -> str | None:
    """The key the earlier scheme gave ``device_id`` (colliding: ``aa:bb`` and ``aa_bb`` share
    it). Only for deleting what that scheme left behind (a device's old memory when it is
    unbound or its owner deleted); never read through it. None where that key is the default
    agent's (``default``), which must not be deleted for a device."""
    key = re.sub(r"[^-_=.a-zA-Z0-9]", "_", device_id.lower()) or "_"
    return None if key == DEFAULT_KEY else key


class AgentConfig(BaseModel):
    """What a device's assistant is: persona, voice, memory and tools."""

    model_config = {"extra": "ignore"}

    # Which agent this is; devices that share an agent share its bridges' tools (MCP endpoint
    # tokens map to an agent id).
    agent_id: str = "default"
    name: str = "Xiaozhi"
    role_prompt: str | None = None  # None: the LLM stage's configured system prompt
    voice: str | None = None  # a Piper voice path; None: the TTS default
    # A named TTS engine (tts.engines: "piper", "zh", ...); None: the reply language's engine.
    tts_engine: str | None = None
    language: str | None = None  # e.g. "en", "zh"; "auto": detected per turn; None: the ASR's language
    memory: Literal["none", "short", "summary"] = "short"
    # Server tools this agent may use (None: all). Device tools are always the device's own.
    tools: list[str] | None = None
    wake_greeting: str | None = None
    # The model to ask an OpenAI-compatible LLM server for (vLLM serving several); None: the
    # LLM stage's configured model. The embedded llama.cpp has one model and ignores it.
    llm_model: str | None = None
    # Which LLM backend answers: a name from the LLM stage's `llm.providers`; None: its default.
    llm_backend: str | None = None
    # Which ASR engine transcribes: a name from the ASR stage's engines (`asr.engines`, and the
    # built-in Whisper models by model name: `asr.model`, `asr.models`); None: `asr.engine`.
    asr_model: str | None = None
    # Words the engine should expect (names, device names), for engines that take hotwords.
    asr_hotwords: list[str] = Field(default_factory=list)
    # Heard -> meant, applied to every engine's transcript (the reference manager's correct_words).
    asr_corrections: dict[str, str] = Field(default_factory=dict)
    # The devices' clock (OTA ``server_time.timezone_offset``, minutes east of UTC, e.g. 480 for
    # China); None: the gateway's ``gateway.timezone_offset_minutes``.
    timezone_offset_minutes: int | None = None

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
    for key in (None if reserved_device_id(device_id) else kv_key(device_id), DEFAULT_KEY):
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
    """Write a device's agent; ``device_id=None`` writes the default agent. A reserved id
    (``default``, empty) raises ValueError: no device may replace the default agent."""
    if device_id is None:
        await kv.put(DEFAULT_KEY, agent.encode())
        return
    if reserved_device_id(device_id):
        raise ValueError(f"reserved device id {device_id!r}: no agent may be saved for it")
    await kv.put(kv_key(device_id), agent.encode())
