"""ASR engines by name: one interface over every engine type, the fallback, and the errors.

An engine turns one utterance (16 kHz mono int16 PCM) into text. Two kinds:

- whole-utterance engines (``whisper``, ``openai``) get the cut utterance;
- streaming engines (``funasr``, ``doubao``, ``aliyun``) take audio while the user speaks:
  :meth:`StreamingEngine.open_stream` gives a stream to send chunks into and finish. Given a
  whole utterance they stream it as fast as their protocol allows.

``asr.engines`` names them (the built-in Whisper models are engines named after the model);
:class:`EngineSet` builds each once, bounds each call by the engine's ``timeout_s``, and on an
error or a timeout asks ``asr.fallback``. An engine type registers its factory with
:func:`register`, so remote engines live in their own modules (``asr_svc/remote/``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from asr_svc.engine import Transcript, WhisperEngine
from asr_svc.metrics import BATCH_SIZE, ENGINE_CALLS, ENGINE_SECONDS, FALLBACKS
from shared.audio import int16_to_float
from shared.metrics import ERRORS
from shared.settings import STREAMING_ASR_TYPES, AsrSettings

log = logging.getLogger("asr_svc.providers")

SAMPLE_RATE = 16000

# Where each remote engine type's factory lives (imported at first use).
REMOTE_MODULES = {
    "openai": "asr_svc.remote.openai_asr",
    "funasr": "asr_svc.remote.funasr",
    "doubao": "asr_svc.remote.doubao",
    "aliyun": "asr_svc.remote.aliyun",
}


@dataclass
class AsrRequest:
    """What the turn asks of the engine besides the audio."""

    language: str | None = None  # the agent's language (e.g. "zh"); None: the engine's own
    detect: bool = False  # the agent's language is "auto": a multilingual engine detects it
    hotwords: list[str] = field(default_factory=list)  # names, device names: engines that take them
    session_id: str = ""
    turn_id: str = ""


class EngineError(Exception):
    """An engine could not transcribe: ``reason`` is a short label for logs and metrics (auth,
    quota, bad_audio, timeout, unavailable, protocol, server); the message says what the
    engine's server answered."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AsrFailed(Exception):
    """Neither the chosen engine nor the fallback produced text."""


class Engine(Protocol):
    name: str
    type: str
    streaming: bool
    multilingual: bool
    timeout_s: float

    async def transcribe(self, pcm: np.ndarray, request: AsrRequest) -> Transcript: ...

    async def close(self) -> None: ...


class AsrStream(Protocol):
    """One utterance streamed to an engine while it is spoken."""

    async def send(self, pcm: np.ndarray) -> None: ...

    async def finish(self) -> Transcript: ...

    async def cancel(self) -> None: ...


class StreamingEngine:
    """Base of the streaming engines: :meth:`transcribe` streams a whole utterance through
    :meth:`open_stream` in ``chunk_ms`` chunks, without waiting between them."""

    streaming = True
    multilingual = True
    chunk_ms = 200

    name: str
    type: str
    timeout_s: float

    async def open_stream(self, request: AsrRequest, on_partial: Callable[[str], Awaitable[None]] | None = None) -> AsrStream:
        raise NotImplementedError

    async def transcribe(self, pcm: np.ndarray, request: AsrRequest) -> Transcript:
        stream = await self.open_stream(request)
        try:
            step = SAMPLE_RATE * self.chunk_ms // 1000
            for start in range(0, len(pcm), step):
                await stream.send(pcm[start : start + step])
            return await stream.finish()
        except BaseException:
            await stream.cancel()
            raise

    async def close(self) -> None:
        return None


class WhisperAdapter:
    """faster-whisper behind the engine interface, in the worker's thread pool. With
    ``batch_size`` > 1 (a GPU), utterances that wait at the same time go through the model
    together (:meth:`WhisperEngine.transcribe_batch`)."""

    type = "whisper"
    streaming = False
    BATCH_WAIT_S = 0.005  # how long the first utterance waits for others to join its batch

    def __init__(self, name: str, engine: WhisperEngine, pool: Executor, timeout_s: float, batch_size: int = 1) -> None:
        self.name = name
        self.engine = engine
        self.pool = pool
        self.timeout_s = timeout_s
        self.multilingual = engine.multilingual
        self.batch_size = max(1, batch_size)
        self.batches = 0  # passes of the model made for batches (tests, logs)
        self._waiting: list[tuple[np.ndarray, str | None, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None

    async def transcribe(self, pcm: np.ndarray, request: AsrRequest) -> Transcript:
        audio = int16_to_float(pcm)
        language = ("auto" if request.detect else request.language) if self.multilingual else None
        loop = asyncio.get_running_loop()
        hotwords = ", ".join(request.hotwords) if request.hotwords else None
        if hotwords:
            return await loop.run_in_executor(self.pool, self.engine.transcribe, audio, language, hotwords)
        if self.batch_size > 1:
            future: asyncio.Future = loop.create_future()
            self._waiting.append((audio, language, future))
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run_batches())
            return await future
        if language:
            return await loop.run_in_executor(self.pool, self.engine.transcribe, audio, language)
        return await loop.run_in_executor(self.pool, self.engine.transcribe, audio)

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            await asyncio.sleep(self.BATCH_WAIT_S)
            batch, self._waiting = self._waiting[: self.batch_size], self._waiting[self.batch_size :]
            batch = [item for item in batch if not item[2].done()]  # a caller that gave up
            if not batch:
                continue
            BATCH_SIZE.observe(len(batch))
            self.batches += 1
            try:
                results = await loop.run_in_executor(self.pool, self.engine.transcribe_batch, [a for a, _, _ in batch], [lang for _, lang, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch hears it
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        return None


Factory = Callable[[str, Any, AsrSettings], Engine]
_FACTORIES: dict[str, Factory] = {}


def register(type_name: str, factory: Factory) -> None:
    """Make an engine type known (its module calls this at import)."""
    _FACTORIES[type_name] = factory


def _factory(type_name: str) -> Factory:
    if type_name not in _FACTORIES and type_name in REMOTE_MODULES:
        importlib.import_module(REMOTE_MODULES[type_name])
    if type_name not in _FACTORIES:
        raise EngineError("unknown_type", f"no ASR engine of type {type_name!r}")
    return _FACTORIES[type_name]


def _whisper(name: str, cfg: Any, asr: AsrSettings, pool: Executor) -> WhisperAdapter:
    engine = WhisperEngine(
        cfg.model,
        cfg.language or asr.language,
        cfg.beam_size or asr.beam_size,
        asr.threads,
        asr.initial_prompt,
        asr.beam_size_zh,
        device=cfg.device,
        compute_type=cfg.compute_type,
    )
    # Batching pays on a GPU; on a CPU one utterance already uses every thread.
    batch = cfg.batch_size if engine.device == "cuda" else 1
    return WhisperAdapter(name, engine, pool, cfg.timeout_s, batch)


class EngineSet:
    """The engines this worker may use, each built once, at its first utterance."""

    def __init__(self, asr: AsrSettings, pool: Executor, prebuilt: dict[str, Engine] | None = None) -> None:
        self.asr = asr
        self.pool = pool
        self.configs = asr.engine_settings()
        self.engines: dict[str, Engine] = dict(prebuilt or {})
        self._lock = asyncio.Lock()
        self.default = asr.default_engine()
        self.fallback = asr.fallback_engine()
        if self.default not in self.configs and self.default not in self.engines:
            raise ValueError(f"asr.engine {self.default!r} is not an engine: one of {sorted(self.configs)}")
        if self.fallback is not None and self.fallback not in self.configs and self.fallback not in self.engines:
            raise ValueError(f"asr.fallback {self.fallback!r} is not an engine: one of {sorted(self.configs)}")

    def names(self) -> list[str]:
        return list(self.configs)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": name, "type": cfg.type, "streaming": cfg.type in STREAMING_ASR_TYPES} for name, cfg in self.configs.items()]

    async def get(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is not None:
            return engine
        cfg = self.configs[name]
        async with self._lock:
            engine = self.engines.get(name)
            if engine is None:
                if cfg.type == "whisper":
                    engine = await asyncio.get_running_loop().run_in_executor(self.pool, _whisper, name, cfg, self.asr, self.pool)
                else:
                    engine = _factory(cfg.type)(name, cfg, self.asr)
                self.engines[name] = engine
                log.info("ASR engine ready", extra={"fields": {"engine": name, "type": cfg.type}})
        return engine

    def fallback_for(self, name: str) -> str | None:
        """The engine that answers when ``name`` fails: its own ``fallback``, else the stage's."""
        cfg = self.configs.get(name)
        own = getattr(cfg, "fallback", None)
        if own == "":
            return None
        chosen = own or self.fallback
        if chosen is not None and chosen not in self.configs and chosen not in self.engines:
            ERRORS.labels("asr", "unknown_fallback").inc()
            return self.fallback
        return chosen

    def choose(self, name: str | None) -> str:
        """The engine an agent named, or the default when it names none or one not configured."""
        if not name:
            return self.default
        if name not in self.configs and name not in self.engines:
            ERRORS.labels("asr", "unknown_engine").inc()
            log.warning("agent names an ASR engine that is not configured: %s (using %s)", name, self.default)
            return self.default
        return name

    async def _call(self, name: str, pcm: np.ndarray, request: AsrRequest) -> Transcript:
        engine = await self.get(name)
        try:
            return await asyncio.wait_for(engine.transcribe(pcm, request), engine.timeout_s)
        except asyncio.TimeoutError as exc:
            raise EngineError("timeout", f"no final text within {engine.timeout_s:g} s") from exc

    async def transcribe(self, name: str | None, pcm: np.ndarray, request: AsrRequest, chosen_failed: str | None = None, chosen_error: str = "") -> tuple[Transcript, str]:
        """Text of the utterance and the engine that produced it; :class:`AsrFailed` when
        neither the chosen engine nor the fallback could. ``chosen_failed``: the chosen engine
        already failed on this audio (its stream, for that reason): only the fallback is asked."""
        chosen = self.choose(name)
        fallback = self.fallback_for(chosen)
        tried: list[tuple[str, str]] = []
        candidates = [chosen] + ([fallback] if fallback and fallback != chosen else [])
        if chosen_failed is not None:
            ENGINE_CALLS.labels(chosen, chosen_failed).inc()
            tried.append((chosen, chosen_failed))
            log.error("ASR engine failed", extra={"fields": {"engine": chosen, "reason": chosen_failed, "error": chosen_error[:300], "streamed": True}})
            if len(candidates) > 1:
                FALLBACKS.labels(chosen, chosen_failed).inc()
            candidates = candidates[1:]
        for candidate in candidates:
            started = time.perf_counter()
            try:
                transcript = await self._call(candidate, pcm, request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any engine failure: log, count, fall back
                reason = exc.reason if isinstance(exc, EngineError) else "error"
                ENGINE_CALLS.labels(candidate, reason).inc()
                tried.append((candidate, reason))
                log.error("ASR engine failed", extra={"fields": {"engine": candidate, "reason": reason, "error": str(exc)[:300]}})
                if candidate == chosen and fallback and fallback != chosen:
                    FALLBACKS.labels(chosen, reason).inc()
                continue
            ENGINE_CALLS.labels(candidate, "ok").inc()
            ENGINE_SECONDS.labels(candidate).observe(time.perf_counter() - started)
            return transcript, candidate
        raise AsrFailed(", ".join(f"{n}: {r}" for n, r in tried))

    async def close(self) -> None:
        for engine in self.engines.values():
            try:
                await engine.close()
            except Exception:  # noqa: BLE001
                pass
