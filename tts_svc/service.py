"""The TTS worker: one sentence in, paced-ready 60 ms Opus frames out to the session's gateway.

Frames are published as soon as each phrase is synthesised, bracketed by ``sentence_start`` and
``sentence_end`` events that carry the sentence's ``seq``; the gateway orders sentences of a turn
by ``seq``, so several workers can synthesise one turn in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from shared import logging as xlog
from shared.audio import FrameCutter, OpusEncoder, Resampler
from shared.messages import AudioFrameMeta, OutEvent, SentenceJob
from shared.metrics import DROPPED, ERRORS, histogram
from shared.phrases import phrase
from shared.settings import Settings
from shared.subjects import QUEUE_TTS, Subjects, session_from_subject
from shared.voices import VoiceRefused, resolve_voice
from shared.workqueue import WorkPuller
from tts_svc.engine import PiperEngine, TtsEngine, build_engine

log = logging.getLogger("tts_svc")

FIRST_FRAME = histogram("xz_tts_first_frame_seconds", "Sentence received to its first Opus frame published")
SENTENCE_SECONDS = histogram("xz_tts_sentence_seconds", "Time to synthesise and encode one sentence")
RTF = histogram("xz_tts_real_time_factor", "Synthesis time divided by audio duration")
SENTENCES = Counter("xz_tts_sentences_total", "Sentences synthesised, by outcome", ["outcome"])
IN_FLIGHT = Gauge("xz_tts_in_flight", "Sentences being synthesised now")
ENGINE_SENTENCES = Counter("xz_tts_engine_sentences_total", "Sentences by the engine that spoke them", ["engine"])
FALLBACKS = Counter("xz_tts_fallbacks_total", "Sentences the chosen engine could not speak, handed to tts.fallback", ["engine", "reason"])

_DONE = object()


def _release_memory() -> None:
    """Free an unloaded voice's model now and hand the memory back to the system (glibc keeps
    freed heap otherwise, and the next voice would come on top of it)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class TtsWorker:
    name = "tts"

    def __init__(self, settings: Settings, engine: TtsEngine | None = None) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.nats.prefix)
        # Named engines (tts.engines and the built-in ones), each built at its first sentence.
        self._specs = settings.tts.engine_specs()
        self._engines: dict[str, TtsEngine] = {}
        if engine is not None:
            self._engines[settings.tts.engine] = engine
        self._engine_lock = threading.Lock()
        self._broken: dict[str, str] = {}  # engine name -> why it could not be built
        # Chosen voices (tts.voices names) loaded, least recently used first, at most
        # tts.max_loaded_voices; refused voices already logged (bounded).
        self._voices: OrderedDict[str, TtsEngine] = OrderedDict()
        self._voice_lock = threading.Lock()
        self._refused_logged: OrderedDict[str, None] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")
        # Clips of fixed phrases (greeting, busy, sorry), per voice, rate and frame size.
        self._clips: OrderedDict[tuple, list[bytes]] = OrderedDict()
        self.nc: NATS | None = None
        self._say_sub = None
        self._puller: WorkPuller | None = None

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        await asyncio.get_running_loop().run_in_executor(self._pool, self._prewarm_clips)
        self._say_sub = await nc.subscribe(self.subjects.say_all, queue=QUEUE_TTS, cb=self._on_say)
        self._puller = WorkPuller(nc, self.subjects, "tts", self.settings.work, self._on_work, self.settings.work.tts.concurrency, "tts")
        await self._puller.start()

    async def stop(self) -> None:
        if self._say_sub is not None:
            await self._say_sub.unsubscribe()
        if self._puller is not None:
            await self._puller.stop(self.settings.nats.drain_timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def queue_depths(self) -> dict[str, int]:
        return {"tts": self._puller.backlog if self._puller else 0}

    async def _on_work(self, msg: Msg, _delivery: int) -> None:
        # A redelivered sentence is synthesised again from its first frame; the gateway drops
        # the frames it already has.
        await self._on_sentence(msg)

    async def _on_say(self, msg: Msg) -> None:
        """A fixed phrase: from the clip cache (pre-rendered), else synthesised and cached."""
        try:
            job = SentenceJob.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("tts", "bad_job").inc()
            return
        job.cache = True
        with xlog.bind(session_id=job.session_id, turn_id=job.turn_id):
            await self._synthesise(job)

    @property
    def engine(self) -> TtsEngine:
        """The default engine (``tts.engine``)."""
        return self._named(self.settings.tts.engine)

    def _named(self, name: str) -> TtsEngine:
        """Engine ``name``, built at first use; raises when it cannot be built (remembered)."""
        with self._engine_lock:
            engine = self._engines.get(name)
            if engine is not None:
                return engine
            if name in self._broken:
                raise RuntimeError(self._broken[name])
            spec = self._specs.get(name)
            if spec is None:
                raise KeyError(f"no TTS engine named {name!r}")
            try:
                engine = build_engine(spec)
            except Exception as exc:  # noqa: BLE001 - a missing voice file: counted, the fallback speaks
                self._broken[name] = f"TTS engine {name!r} ({spec.type}) not usable: {exc}"
                log.error("%s", self._broken[name])
                raise RuntimeError(self._broken[name]) from exc
            self._engines[name] = engine
            return engine

    def engine_name(self, engine: str | None, language: str | None) -> str:
        """Which named engine speaks: the agent's choice, else the reply language's
        (``tts.languages``), else ``tts.engine``. An unknown name is counted and logged."""
        tts = self.settings.tts
        if engine and engine != "default":
            if engine in self._specs:
                return engine
            self._fallback(f"engine:{engine}", "unknown_engine", f"TTS engine {engine[:60]!r} is not one of {sorted(self._specs)}")
        if language:
            by_language = tts.languages.get(language.split("-")[0].lower())
            if by_language:
                return by_language
        return tts.engine

    def health(self) -> dict[str, Any]:
        return {"ok": True, "engine": self.settings.tts.engine, "loaded_engines": list(self._engines), "broken_engines": self._broken, "loaded_voices": list(self._voices)}

    def _render(self, text: str, voice: str | None, sample_rate: int, frame_duration: int, engine_name: str | None = None, language: str | None = None) -> Iterator[bytes]:
        """Synthesise ``text`` into Opus frames of the device's format (runs in the pool).

        A voice (tts.voices) is a Piper voice; otherwise the named engine speaks (see
        ``engine_name``). When that engine fails before its first frame, ``tts.fallback``
        speaks the sentence instead (counted): the device never gets silence for it."""
        name = self.engine_name(engine_name, language)
        if voice and voice != "default":
            yield from self._encode(self._engine_for(voice), text, sample_rate, frame_duration)
            ENGINE_SENTENCES.labels("piper").inc()
            return
        fallback = self.settings.tts.fallback
        produced = False
        try:
            for frame in self._encode(self._named(name), text, sample_rate, frame_duration):
                produced = True
                yield frame
            ENGINE_SENTENCES.labels(name).inc()
            return
        except Exception as exc:  # noqa: BLE001 - any engine failure: the fallback, or the error
            if produced or not fallback or fallback == name:
                raise
            FALLBACKS.labels(name, type(exc).__name__).inc()
            log.warning("TTS engine failed, the fallback speaks: %s", exc, extra={"fields": {"engine": name, "fallback": fallback}})
        yield from self._encode(self._named(fallback), text, sample_rate, frame_duration)
        ENGINE_SENTENCES.labels(fallback).inc()

    def _encode(self, engine: TtsEngine, text: str, sample_rate: int, frame_duration: int) -> Iterator[bytes]:
        encoder = OpusEncoder(sample_rate, frame_duration)
        resampler = Resampler(engine.sample_rate, sample_rate)
        cutter = FrameCutter(encoder.frame_samples)
        for chunk in engine.synthesize(text):
            for frame in cutter.push(resampler.push(chunk)):
                yield encoder.encode(frame)
        for frame in cutter.push(resampler.push(np.zeros(0, dtype=np.int16), last=True)) + cutter.flush():
            yield encoder.encode(frame)

    def _prewarm_clips(self) -> None:
        """Render the gateway's fixed phrases now, in English and in each language that has its
        own engine (tts.languages), so "busy" and "sorry" cost no synthesis later, when the
        stage may be saturated."""
        gw = self.settings.gateway
        phrases: list[tuple[str, str | None, str | None]] = [(gw.busy_text, None, None), (gw.error_text, None, None), (gw.wake_word_greeting, gw.greeting_voice, None)]
        for language in self.settings.tts.languages:
            for key, english in (("busy", gw.busy_text), ("sorry", gw.error_text), ("greeting", gw.wake_word_greeting)):
                if english:
                    phrases.append((phrase(key, language, english), None, language))
        for text, voice, language in phrases:
            if not text:
                continue
            try:
                frames = list(self._render(text, voice, gw.sample_rate, gw.frame_duration, None, language))
            except Exception as exc:  # noqa: BLE001 - a bad greeting voice must not stop the worker
                log.warning("could not pre-render a phrase: %s", exc, extra={"fields": {"text": text[:60]}})
                continue
            self._clips[(voice or "", self.engine_name(None, language), text, gw.sample_rate, gw.frame_duration)] = frames

    def _engine_for(self, voice: str | None) -> TtsEngine:
        """The engine of a configured voice name (tts.voices), loaded at its first sentence and
        kept while among the tts.max_loaded_voices used last; the default engine for no voice,
        "default", and any voice this worker may not open (counted and logged)."""
        if not voice or voice == "default":
            return self.engine
        tts = self.settings.tts
        with self._voice_lock:
            engine = self._voices.get(voice)
            if engine is not None:
                self._voices.move_to_end(voice)
                return engine
            try:
                path = resolve_voice(voice, tts.voices, tts.voices_dir)
            except VoiceRefused as exc:
                return self._fallback(voice, exc.reason, str(exc))
            # Make room first, so that no more than max_loaded_voices are ever in memory.
            if len(self._voices) >= tts.max_loaded_voices:
                while len(self._voices) >= tts.max_loaded_voices:
                    dropped, _ = self._voices.popitem(last=False)
                    log.info("voice unloaded", extra={"fields": {"voice": dropped}})
                _release_memory()
            try:
                engine = PiperEngine(path, tts.length_scale)
            except Exception as exc:  # noqa: BLE001 - a broken voice file: the default speaks
                return self._fallback(voice, "voice_load", f"voice {voice!r} not loadable: {exc}")
            self._voices[voice] = engine
            return engine

    def _fallback(self, voice: str, reason: str, message: str) -> TtsEngine:
        ERRORS.labels("tts", reason).inc()
        if voice not in self._refused_logged:  # one line per voice (the last 256 of them)
            self._refused_logged[voice] = None
            while len(self._refused_logged) > 256:
                self._refused_logged.popitem(last=False)
            log.warning("voice refused, the default voice speaks: %s", message, extra={"fields": {"reason": reason}})
        return self.engine

    async def _on_sentence(self, msg: Msg) -> None:
        try:
            job = SentenceJob.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("tts", "bad_job").inc()
            log.warning("bad sentence job dropped", extra={"session_id": session_from_subject(msg.subject)})
            return
        with xlog.bind(session_id=job.session_id, turn_id=job.turn_id):
            IN_FLIGHT.inc()
            try:
                await self._synthesise(job)
            finally:
                IN_FLIGHT.dec()

    async def _synthesise(self, job: SentenceJob) -> None:
        assert self.nc is not None
        out = self.subjects.out(job.session_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        started = time.perf_counter()
        await self.nc.publish(out, OutEvent(kind="sentence_start", session_id=job.session_id, turn_id=job.turn_id, seq=job.seq, text=job.text).encode())
        clip_key = (job.voice or "", self.engine_name(job.engine, job.language), job.text, job.sample_rate, job.frame_duration)
        if job.cache and clip_key in self._clips:
            frames = self._clips[clip_key]
            self._clips.move_to_end(clip_key)
            for index, frame in enumerate(frames):
                await self.nc.publish(out, frame, headers=AudioFrameMeta(turn_id=job.turn_id, seq=job.seq, index=index).headers())
            await self.nc.publish(out, OutEvent(kind="sentence_end", session_id=job.session_id, turn_id=job.turn_id, seq=job.seq, frames=len(frames)).encode())
            SENTENCES.labels("cached").inc()
            FIRST_FRAME.observe(time.perf_counter() - started)
            log.info("sentence from clip cache", extra={"fields": {"seq": job.seq, "engine": clip_key[1], "frames": len(frames), "text": job.text[:80]}})
            return
        produced: list[bytes] = []

        def work() -> None:
            try:
                for frame in self._render(job.text, job.voice, job.sample_rate, job.frame_duration, job.engine, job.language):
                    loop.call_soon_threadsafe(queue.put_nowait, frame)
            except Exception as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._pool, work)
        index = 0
        failed = False
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, Exception):
                failed = True
                ERRORS.labels("tts", "synthesis").inc()
                log.error("synthesis failed: %s", item)
                continue
            if index == 0:
                FIRST_FRAME.observe(time.perf_counter() - started)
            meta = AudioFrameMeta(turn_id=job.turn_id, seq=job.seq, index=index)
            await self.nc.publish(out, item, headers=meta.headers())
            if job.cache:
                produced.append(item)
            index += 1
        await future
        elapsed = time.perf_counter() - started
        # Always close the sentence, even a failed one, so the turn can go on to the next.
        await self.nc.publish(out, OutEvent(kind="sentence_end", session_id=job.session_id, turn_id=job.turn_id, seq=job.seq, frames=index).encode())
        if job.cache and not failed and produced:
            self._clips[clip_key] = produced
            while len(self._clips) > 64:
                self._clips.popitem(last=False)
        SENTENCE_SECONDS.observe(elapsed)
        audio_s = index * job.frame_duration / 1000
        if audio_s:
            RTF.observe(elapsed / audio_s)
        SENTENCES.labels("error" if failed else "ok").inc()
        log.info("sentence", extra={"fields": {"seq": job.seq, "engine": "piper" if job.voice and job.voice != "default" else self.engine_name(job.engine, job.language), "frames": index, "seconds": round(elapsed, 3), "text": job.text[:80]}})
