"""The ASR worker: utterance in (Opus frames), user turn text out to the LLM stage."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from asr_svc.metrics import CORRECTIONS, ENGINE_CALLS, IN_FLIGHT, RTF, SECONDS, UTTERANCES
from asr_svc.live import LIVE, LiveStreams, StreamFailed
from asr_svc.providers import AsrFailed, AsrRequest, Engine, EngineSet
from shared import logging as xlog
from shared.agents import AgentDirectory
from shared.ogg import ogg_opus
from shared.audio import decode_packets
from shared.messages import OutEvent, UserTurn, Utterance
from shared.metrics import DROPPED, ERRORS
from shared.settings import Settings
from shared.subjects import Subjects, session_from_subject
from shared.workqueue import StageBusy, StageUnavailable, WorkPuller, publish_work

log = logging.getLogger("asr_svc")

# Whisper's stock hallucinations on noise or silence; they are not a user turn.
_HALLUCINATIONS = {"", "you", "thank you", "thanks for watching", "bye", ".", "thank you for watching"}
_EDGE_PUNCT = re.compile(r"^[\s\.,!?;:，。！？；：、…\-\"'“”]+|[\s,;:，；：、\-\"'“”]+$")


def clean_text(text: str) -> str:
    """Strip the punctuation and spaces Whisper leaves at the edges (keeps a final ?/./!)."""
    return _EDGE_PUNCT.sub("", text).strip()


def is_noise(text: str) -> bool:
    return re.sub(r"[^\w\s]", "", text).strip().lower() in _HALLUCINATIONS


def correct(text: str, corrections: dict[str, str]) -> str:
    """An agent's correction list (heard -> meant) applied to a transcript in one pass: the
    longest match wins (a phrase over a word inside it), letters match in any case, and a
    replacement is never corrected again."""
    heard = sorted((h for h in corrections if h), key=len, reverse=True)
    if not heard:
        return text
    meant = {h.casefold(): corrections[h] for h in heard}
    pattern = re.compile("|".join(re.escape(h) for h in heard), re.IGNORECASE)
    return pattern.sub(lambda m: meant.get(m.group(0).casefold(), m.group(0)), text)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w]", " ", text).lower().split())


def only_wake_word(text: str, wake_word: str) -> bool:
    """Is the transcript the wake word and nothing else (said once or repeated)? Then the
    utterance that began with it held no question."""
    word = _words(wake_word)
    if not word:
        return False
    rest = " ".join(_words(text).replace(word, " ").split())
    return not rest or is_noise(rest)


class AsrWorker:
    name = "asr"

    agents: AgentDirectory | None = None
    _audio_store = None

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        # CTranslate2's OpenMP threads sleep when a transcription is done instead of spinning:
        # the next stage (the LLM) runs right then, on the same cores. (Not for llama.cpp, whose
        # OpenMP threads must not sleep between tokens: it would triple its time per sentence.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.settings = settings
        self.asr = settings.asr
        self.subjects = Subjects(settings.nats.prefix)
        # One model, one thread: Whisper uses all its cpu_threads per call already.
        self._pool = ThreadPoolExecutor(max_workers=max(1, settings.work.asr.concurrency), thread_name_prefix="whisper")
        # Every engine by name (asr.engines and the built-in Whisper models), built at first use;
        # ``engine`` (tests) stands as the default one.
        self.engines = EngineSet(self.asr, self._pool, {self.asr.default_engine(): engine} if engine else None)
        self.nc: NATS | None = None
        self._puller: WorkPuller | None = None
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.live: LiveStreams | None = None

    async def _keep_audio(self, turn_id: str, packets: list[bytes]) -> str | None:
        """The utterance as Ogg Opus in the xz_audio object store; its name, or None on failure."""
        name = f"{turn_id}.ogg"
        try:
            if self._audio_store is None:
                js = self.nc.jetstream()  # type: ignore[union-attr]
                try:
                    self._audio_store = await js.object_store(self.subjects.obj_audio)
                except Exception:  # noqa: BLE001 - first use: make it
                    from nats.js.api import ObjectStoreConfig

                    config = ObjectStoreConfig(bucket=self.subjects.obj_audio, ttl=self.asr.keep_audio_days * 86400, replicas=self.settings.work.replicas)
                    self._audio_store = await js.create_object_store(self.subjects.obj_audio, config=config)
            await asyncio.wait_for(self._audio_store.put(name, ogg_opus(packets, 16000)), 5)
            return name
        except Exception as exc:  # noqa: BLE001 - the turn goes on without its recording
            ERRORS.labels("asr", "keep_audio").inc()
            log.warning("utterance audio not kept: %s", exc)
            return None

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        self.agents = AgentDirectory(nc, self.subjects.kv_agents)
        # Build the default engine and the fallback now, and warm a local model up, so the
        # first user does not pay for lazy initialisation (a remote engine is asked nothing).
        import numpy as np

        for name in dict.fromkeys(n for n in (self.engines.default, self.engines.fallback) if n):
            engine = await self.engines.get(name)
            if engine.type == "whisper":
                await engine.transcribe(np.zeros(16000, dtype=np.int16), AsrRequest())
        self.live = LiveStreams(nc, self.subjects, self.engines, self.agents, self.worker_id)
        await self.live.start()
        self._puller = WorkPuller(nc, self.subjects, "asr", self.settings.work, self._on_work, self.settings.work.asr.concurrency, "asr")
        await self._puller.start()

    async def stop(self) -> None:
        if self._puller is not None:
            await self._puller.stop(self.settings.nats.drain_timeout_s)
        if self.live is not None:
            await self.live.stop()
        await self.engines.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def queue_depths(self) -> dict[str, int]:
        return {"asr": self._puller.backlog if self._puller else 0}

    async def _on_work(self, msg: Msg, _delivery: int) -> None:
        await self._on_utterance(msg)

    async def _tell(self, meta: Utterance, kind: str) -> None:
        """Tell the gateway what became of the utterance it is waiting on."""
        try:
            await self.nc.publish(self.subjects.out(meta.session_id), OutEvent(kind=kind, session_id=meta.session_id, turn_id=meta.turn_id).encode())  # type: ignore[union-attr,arg-type]
        except Exception as exc:  # noqa: BLE001
            log.warning("could not tell the gateway: %s", exc)

    async def _transcribe(self, meta: Utterance, name: str | None, pcm, request: AsrRequest):
        """The streamed text where the utterance was streamed while spoken, else (or when the
        stream has none) the whole utterance through the chosen engine and its fallback."""
        if meta.streamer and self.live is not None:
            chosen = self.engines.choose(name)
            timeout = (await self.engines.get(chosen)).timeout_s
            try:
                transcript = await self.live.result(meta.streamer, meta.turn_id, timeout)
            except StreamFailed as exc:
                LIVE.labels(exc.reason).inc()
                log.warning("streamed text unavailable: transcribing the whole utterance", extra={"fields": {"reason": exc.reason, "engine": chosen, "error": str(exc)[:300]}})
                if exc.reason == "engine_failed":
                    return await self.engines.transcribe(name, pcm, request, chosen_failed=exc.engine_reason or "error", chosen_error=str(exc))
            else:
                LIVE.labels("streamed").inc()
                ENGINE_CALLS.labels(chosen, "ok").inc()
                return transcript, chosen
        return await self.engines.transcribe(name, pcm, request)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "model": self.asr.model, "engine": self.engines.default, "fallback": self.engines.fallback, "engines": self.engines.describe(), "loaded": sorted(self.engines.engines)}

    async def _on_utterance(self, msg: Msg) -> None:
        session_id = session_from_subject(msg.subject)
        try:
            meta, packets = Utterance.unpack(msg.data)
        except Exception as exc:  # noqa: BLE001
            DROPPED.labels("asr", "bad_utterance").inc()
            log.warning("bad utterance dropped: %s", exc, extra={"session_id": session_id})
            return
        with xlog.bind(session_id=meta.session_id, turn_id=meta.turn_id):
            IN_FLIGHT.inc()
            try:
                pcm = decode_packets(packets, 16000)
                started = time.perf_counter()
                agent = await self.agents.get(meta.device_id)
                request = AsrRequest(
                    language=agent.language if agent and agent.language != "auto" else None,
                    detect=bool(agent and agent.language == "auto"),
                    hotwords=list(agent.asr_hotwords) if agent else [],
                    session_id=meta.session_id,
                    turn_id=meta.turn_id,
                )
                transcript, used = await self._transcribe(meta, agent.asr_model if agent else None, pcm, request)
                elapsed = time.perf_counter() - started
            except AsrFailed as exc:
                # Neither the chosen engine nor the fallback: the user hears a sorry, not silence.
                UTTERANCES.labels("failed").inc()
                log.error("no engine transcribed the utterance", extra={"fields": {"tried": str(exc)}})
                await self._tell(meta, "failed")
                return
            except Exception:  # noqa: BLE001
                ERRORS.labels("asr", "transcribe").inc()
                UTTERANCES.labels("error").inc()
                log.exception("transcription failed")
                await self._tell(meta, "failed")
                return
            finally:
                IN_FLIGHT.dec()
            SECONDS.observe(elapsed)
            if transcript.audio_s > 0:
                RTF.observe(elapsed / transcript.audio_s)
            text = clean_text(transcript.text)
            corrected = correct(text, agent.asr_corrections if agent else {})
            log.info("transcript", extra={"fields": {"text": text, "engine": used, "audio_s": round(transcript.audio_s, 2), "seconds": round(elapsed, 3), **({"corrected": corrected} if corrected != text else {})}})
            if corrected != text:
                CORRECTIONS.inc()
                text = corrected
            if is_noise(text):
                UTTERANCES.labels("empty").inc()
                await self._tell(meta, "discard")
                return
            if meta.wake_word and only_wake_word(text, meta.wake_word):
                # The wake word was all the "question" held (said twice, or a breath after it).
                UTTERANCES.labels("wake_word_only").inc()
                await self._tell(meta, "discard")
                return
            UTTERANCES.labels("ok").inc()
            audio = await self._keep_audio(meta.turn_id, packets) if self.asr.keep_audio and meta.device_id else None
            turn = UserTurn(
                session_id=meta.session_id,
                turn_id=meta.turn_id,
                device_id=meta.device_id,
                text=text,
                source="asr",
                language=transcript.language,
                speech_end_ms=meta.speech_end_ms,
                audio=audio,
            )
            assert self.nc is not None
            try:
                await publish_work(self.nc, self.subjects.llm(meta.session_id), turn.encode(), self.settings.work.publish_timeout_s)
            except (StageBusy, StageUnavailable) as exc:
                busy = isinstance(exc, StageBusy)
                ERRORS.labels("asr", "llm_busy" if busy else "llm_unavailable").inc()
                log.warning("LLM queue refused the turn: %s", exc)
                await self._tell(meta, "busy")
