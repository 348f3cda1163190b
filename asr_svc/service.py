"""The ASR worker: utterance in (Opus frames), user turn text out to the LLM stage."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from asr_svc.engine import AsrEngine, WhisperEngine
from shared import logging as xlog
from shared.audio import decode_packets, int16_to_float
from shared.messages import UserTurn, Utterance
from shared.metrics import DROPPED, ERRORS, histogram
from shared.settings import Settings
from shared.subjects import QUEUE_ASR, Subjects, session_from_subject

log = logging.getLogger("asr_svc")

SECONDS = histogram("xz_asr_seconds", "Time to transcribe one utterance")
RTF = histogram("xz_asr_real_time_factor", "Transcription time divided by audio duration")
UTTERANCES = Counter("xz_asr_utterances_total", "Utterances transcribed, by outcome", ["outcome"])
IN_FLIGHT = Gauge("xz_asr_in_flight", "Utterances being transcribed now")

# Whisper's stock hallucinations on noise or silence; they are not a user turn.
_HALLUCINATIONS = {"", "you", "thank you", "thanks for watching", "bye", ".", "thank you for watching"}
_EDGE_PUNCT = re.compile(r"^[\s\.,!?;:，。！？；：、…\-\"'“”]+|[\s,;:，；：、\-\"'“”]+$")


def clean_text(text: str) -> str:
    """Strip the punctuation and spaces Whisper leaves at the edges (keeps a final ?/./!)."""
    return _EDGE_PUNCT.sub("", text).strip()


def is_noise(text: str) -> bool:
    return re.sub(r"[^\w\s]", "", text).strip().lower() in _HALLUCINATIONS


class AsrWorker:
    name = "asr"

    def __init__(self, settings: Settings, engine: AsrEngine | None = None) -> None:
        # CTranslate2's OpenMP threads sleep when a transcription is done instead of spinning:
        # the next stage (the LLM) runs right then, on the same cores. (Not for llama.cpp, whose
        # OpenMP threads must not sleep between tokens: it would triple its time per sentence.)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.settings = settings
        self.asr = settings.asr
        self.subjects = Subjects(settings.nats.prefix)
        self.engine = engine or WhisperEngine(self.asr.model, self.asr.language, self.asr.beam_size, self.asr.threads, self.asr.initial_prompt)
        # One model, one thread: Whisper uses all its cpu_threads per call already.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper")
        self.nc: NATS | None = None
        self._sub = None

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        # Warm up so the first user does not pay for lazy initialisation.
        import numpy as np

        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.transcribe, np.zeros(16000, dtype=np.float32))
        self._sub = await nc.subscribe(self.subjects.asr_all, queue=QUEUE_ASR, cb=self._on_utterance)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "model": self.asr.model}

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
                audio = int16_to_float(pcm)
                started = time.perf_counter()
                transcript = await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.transcribe, audio)
                elapsed = time.perf_counter() - started
            except Exception:  # noqa: BLE001
                ERRORS.labels("asr", "transcribe").inc()
                UTTERANCES.labels("error").inc()
                log.exception("transcription failed")
                return
            finally:
                IN_FLIGHT.dec()
            SECONDS.observe(elapsed)
            if transcript.audio_s > 0:
                RTF.observe(elapsed / transcript.audio_s)
            text = clean_text(transcript.text)
            log.info("transcript", extra={"fields": {"text": text, "audio_s": round(transcript.audio_s, 2), "seconds": round(elapsed, 3)}})
            if is_noise(text):
                UTTERANCES.labels("empty").inc()
                return
            UTTERANCES.labels("ok").inc()
            turn = UserTurn(
                session_id=meta.session_id,
                turn_id=meta.turn_id,
                device_id=meta.device_id,
                text=text,
                source="asr",
                language=transcript.language,
                speech_end_ms=meta.speech_end_ms,
            )
            assert self.nc is not None
            await self.nc.publish(self.subjects.llm(meta.session_id), turn.encode())
