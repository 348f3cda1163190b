"""The VAD worker: owns sessions it claims, decodes their Opus, and cuts utterances for ASR."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections import deque
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from shared import logging as xlog
from shared.audio import OpusDecoder
from shared.agents import AgentDirectory
from shared.messages import HDR_RECEIVED, Control, OutEvent, Utterance, VadClaim, VadClaimAck, new_turn_id, now_ms
from shared.metrics import DROPPED, ERRORS, FRAME_BUCKETS, histogram
from shared.settings import STREAMING_ASR_TYPES, Settings, VadSettings
from shared.subjects import QUEUE_VAD, Subjects
from shared.workqueue import StageBusy, StageUnavailable, publish_work
from vad_svc.detector import WINDOW_MS, Segmenter, SegmenterConfig, SileroModel, SpeechScorer

log = logging.getLogger("vad_svc")

SESSIONS = Gauge("xz_vad_sessions", "Sessions owned by this VAD worker")
FRAMES = Counter("xz_vad_frames_total", "Uplink Opus frames processed")
UTTERANCES = Counter("xz_vad_utterances_total", "Utterances sent to ASR, by how they ended", ["reason"])
WAKES = Counter("xz_vad_wake_words_total", "Wake words with their pre-roll, by what followed (end: nothing, a greeting; more: a question in the same breath)", ["outcome"])
# Live speech after a wake word's pre-roll that makes it a question in one breath.
WAKE_MORE_MS = 96
# A control message waits at most this long for the audio frames sent before it.
HOLD_S = 0.5
DECISION_DELAY = histogram("xz_vad_end_of_turn_delay_seconds", "Last speech window to end-of-turn decision")
FRAME_SECONDS = histogram("xz_vad_frame_processing_seconds", "Time to decode and score one frame", buckets=FRAME_BUCKETS)
FRAME_LAG = histogram(
    "xz_vad_frame_lag_seconds",
    "Gateway receipt of an uplink frame to the VAD having scored it (bus, queueing, decoding; one frame in 8)",
    buckets=FRAME_BUCKETS,
)


LIVE_CLAIM_TIMEOUT_S = 0.5
LIVE = Counter("xz_vad_live_asr_total", "Utterances the VAD streamed to an ASR worker while spoken, by outcome (ended, cancelled, unclaimed: no worker took it, it went whole)", ["outcome"])


class LiveUplink:
    """An utterance streamed to the ASR worker that claimed it (asr_svc/live.py)."""

    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.worker: str | None = None  # set once a worker took it
        self.sent = 0  # packets of the utterance published so far
        self.claim: asyncio.Task | None = None
        self.over = False  # ended or cancelled: nothing more is sent
        # The claim's task and the audio loop both send: one at a time, so every packet goes
        # once and in order.
        self.sending = asyncio.Lock()


class SessionStream:
    """The VAD state of one session: decoder, detectors, listen mode, the utterance so far."""

    def __init__(self, claim: VadClaim, settings: VadSettings, model: SileroModel) -> None:
        self.session_id = claim.session_id
        self.device_id = claim.device_id
        self.settings = settings
        self.frame_ms = claim.frame_duration or 60
        self.mode = claim.mode
        self.decoder = OpusDecoder(16000)
        self.scorer = SpeechScorer(model, settings.webrtc_aggressiveness)
        self.segmenter = Segmenter(
            SegmenterConfig(
                threshold=settings.threshold,
                neg_threshold=settings.neg_threshold,
                min_silence_ms=settings.min_silence_ms,
                min_speech_ms=settings.min_speech_ms,
                max_utterance_ms=int(settings.max_utterance_s * 1000),
            )
        )
        self.preroll: deque[bytes] = deque(maxlen=max(1, math.ceil(settings.preroll_ms / self.frame_ms)))
        self.utterance: list[bytes] | None = None
        self.manual: list[bytes] = []
        self.max_frames = int(settings.max_utterance_s * 1000 / self.frame_ms)
        self.last_seen = time.monotonic()
        self.subs: list[Any] = []
        # Audio frames scored, and control messages waiting for the frames sent before them.
        self.frames_seen = 0
        self.held: deque[Control] = deque()
        self.held_since = 0.0
        # After a wake word's pre-roll: live speech and non-speech heard since, until a verdict.
        self.wake_pending = False
        self.wake_speech_ms = 0.0
        self.wake_quiet_ms = 0.0
        self.wake_verdict: str | None = None
        self.wake_word = ""  # the wake word said, while its utterance goes on (verdict "more")
        self.wake_listens = 0  # `listen start`s since the wake word's `detect`
        # The utterance being streamed to an ASR worker while spoken (a streaming engine).
        self.live: LiveUplink | None = None

    def begin_wake(self, word: str = "") -> None:
        """`detect` after the pre-roll burst: the burst (the wake word) stays the start of the
        utterance; the live audio that follows decides whether a question came with it."""
        self.wake_pending = True
        self.wake_speech_ms = self.wake_quiet_ms = 0.0
        self.wake_verdict = None
        self.wake_word = word
        self.wake_listens = 0
        if self.mode == "manual":
            self._wake_end()

    def _wake_end(self) -> None:
        """Nothing followed the wake word: its audio is no turn (the gateway greets)."""
        self.wake_pending = False
        self.wake_verdict = "end"
        self.wake_word = ""
        self.utterance = None
        self.segmenter.reset()
        self.preroll.clear()

    def _wake_step(self, prob: float) -> None:
        if prob >= self.settings.threshold:
            self.wake_speech_ms += WINDOW_MS
            if self.wake_speech_ms >= WAKE_MORE_MS:
                self.wake_pending = False
                self.wake_verdict = "more"
        else:
            self.wake_quiet_ms += WINDOW_MS
            if self.wake_quiet_ms >= self.settings.wake_follow_ms:
                self._wake_end()

    def reset(self) -> None:
        self.scorer.reset()
        self.segmenter.reset()
        self.decoder.reset()
        self.preroll.clear()
        self.utterance = None
        self.manual = []
        self.wake_pending = False
        self.wake_word = ""

    def on_frame(self, packet: bytes) -> tuple[list[bytes], str, float] | None:
        """Feed one Opus packet; returns (packets, reason, silence_s) when an utterance ends."""
        self.last_seen = time.monotonic()
        if self.mode == "manual":
            if len(self.manual) < self.max_frames:
                self.manual.append(packet)
            return None
        try:
            pcm = self.decoder.decode(packet)
        except Exception:  # noqa: BLE001 - garbage from the device is dropped, not fatal
            DROPPED.labels("vad", "bad_opus").inc()
            return None
        finished: tuple[list[bytes], str, float] | None = None
        for prob in self.scorer.push(pcm):
            if self.wake_pending:
                self._wake_step(prob)
                if self.wake_verdict == "end":
                    return None
            decision = self.segmenter.push(prob)
            if decision == "end" and self.wake_pending:
                self._wake_end()  # silence after the wake word ended its utterance: no question
                return None
            if decision == "start":
                self.utterance = list(self.preroll)
                self.preroll.clear()
            elif decision == "end" and self.utterance is not None:
                self.utterance.append(packet)
                reason = "max_length" if self.segmenter.silence_ms < self.settings.min_silence_ms else "silence"
                finished = (self.utterance, reason, self.segmenter.silence_ms / 1000)
                self.utterance = None
                self.scorer.reset()
                return finished
            elif decision == "discard":
                UTTERANCES.labels("too_short").inc()
                self.utterance = None
        if self.utterance is not None:
            self.utterance.append(packet)
        else:
            self.preroll.append(packet)
        return None

    def stop(self) -> list[bytes] | None:
        """`listen stop`: in manual mode everything since `listen start` is the utterance."""
        if self.mode == "manual":
            packets, self.manual = self.manual, []
            min_frames = max(1, int(self.settings.min_speech_ms / self.frame_ms))
            return packets if len(packets) >= min_frames else None
        if self.utterance is not None and self.segmenter.speech_ms >= self.settings.min_speech_ms:
            packets, self.utterance = self.utterance, None
            self.segmenter.reset()
            return packets
        return None


class VadWorker:
    """Claims sessions from the gateway and runs their streams."""

    name = "vad"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.vad = settings.vad
        self.subjects = Subjects(settings.nats.prefix)
        self.model = SileroModel()
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.streams: dict[str, SessionStream] = {}
        self.nc: NATS | None = None
        self._gc_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._claim_sub = None
        # Streaming ASR engines configured (asr.engines): utterances of agents on them are
        # streamed while spoken; with none, nothing here costs a thing.
        self.agents: AgentDirectory | None = None
        engines = settings.asr.engine_settings()
        self._streaming = {name for name, cfg in engines.items() if cfg.type in STREAMING_ASR_TYPES} if self.vad.stream_to_asr else set()
        self._default_engine = settings.asr.default_engine()

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        self.agents = AgentDirectory(nc, self.subjects.kv_agents)
        self._claim_sub = await nc.subscribe(self.subjects.vad_claim, queue=QUEUE_VAD, cb=self._on_claim)
        self._gc_task = asyncio.create_task(self._gc())
        self._heartbeat_task = asyncio.create_task(self._heartbeat())

    async def stop(self) -> None:
        for task in (self._gc_task, self._heartbeat_task):
            if task:
                task.cancel()
        if self._claim_sub is not None:
            await self._claim_sub.unsubscribe()
        # Leaving on purpose (SIGTERM, a rolling update): gateways re-claim at once rather than
        # wait for the heartbeat to lapse.
        await self._announce(leaving=True)

    async def _announce(self, leaving: bool = False) -> None:
        if self.nc is None or not self.nc.is_connected:
            return
        body = json.dumps({"worker_id": self.worker_id, "sessions": len(self.streams), "leaving": leaving}).encode()
        try:
            await self.nc.publish(self.subjects.vad_alive, body)
            if leaving:
                await self.nc.flush(timeout=2)
        except Exception as exc:  # noqa: BLE001 - NATS away: the gateways notice the silence
            log.debug("heartbeat failed: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await self._announce()
            await asyncio.sleep(self.vad.heartbeat_s)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "sessions": len(self.streams), "worker": self.worker_id}

    async def _on_claim(self, msg: Msg) -> None:
        try:
            claim = VadClaim.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("vad", "bad_claim").inc()
            return
        assert self.nc is not None
        stream = self.streams.get(claim.session_id)
        if stream is None:
            stream = SessionStream(claim, self.vad, self.model)
            sid = claim.session_id

            async def on_audio(m: Msg, s: str = sid) -> None:
                await self._on_audio(s, m)

            async def on_ctl(m: Msg, s: str = sid) -> None:
                await self._on_ctl(s, m)

            stream.subs = [
                # Bounded: a minute of frames; beyond that NATS drops them and it is counted as a
                # slow consumer.
                await self.nc.subscribe(self.subjects.audio(sid), cb=on_audio, pending_msgs_limit=1000, pending_bytes_limit=2 * 1024 * 1024),
                await self.nc.subscribe(self.subjects.ctl(sid), cb=on_ctl),
            ]
            self.streams[sid] = stream
            SESSIONS.set(len(self.streams))
        with xlog.bind(session_id=claim.session_id):
            log.info("claimed session", extra={"fields": {"device_id": claim.device_id, "mode": claim.mode}})
        await msg.respond(VadClaimAck(session_id=claim.session_id, worker_id=self.worker_id).encode())

    async def _on_audio(self, session_id: str, msg: Msg) -> None:
        stream = self.streams.get(session_id)
        if stream is None:
            return
        FRAMES.inc()
        started = time.perf_counter()
        was_speaking = stream.utterance is not None
        result = stream.on_frame(msg.data)
        stream.frames_seen += 1
        FRAME_SECONDS.observe(time.perf_counter() - started)
        received = msg.headers.get(HDR_RECEIVED) if msg.headers else None
        if received:
            try:
                FRAME_LAG.observe(max(0.0, time.time() - float(received)))
            except ValueError:
                DROPPED.labels("vad", "bad_header").inc()
        if stream.utterance is not None and not was_speaking and self.nc is not None:
            # Tell the gateway the user started speaking (idle tracking, voice barge-in).
            await self.nc.publish(self.subjects.out(session_id), OutEvent(kind="speech_start", session_id=session_id, turn_id="").encode())
        if self._streaming:
            await self._live_step(stream, was_speaking, result is not None)
        if result is not None:
            packets, reason, silence_s = result
            DECISION_DELAY.observe(max(0.0, silence_s))
            await self._emit(stream, packets, reason, speech_end_ms=now_ms() - int(silence_s * 1000))
        await self._tell_wake(stream)
        if stream.held and (stream.frames_seen >= stream.held[0].frames or time.monotonic() - stream.held_since > HOLD_S):
            await self._release_held(stream)

    async def _live_step(self, stream: SessionStream, was_speaking: bool, ended: bool) -> None:
        """Streaming ASR: claim a worker when speech starts, send it the packets as they come,
        cancel when the utterance is dropped (too short, a bare wake word, a reset)."""
        live = stream.live
        if stream.utterance is not None and not was_speaking and (live is None or live.over):
            stream.live = live = LiveUplink(new_turn_id())
            live.claim = asyncio.create_task(self._live_claim(stream, live))
            return
        if live is None or live.over:
            return
        if stream.utterance is None and not ended:
            await self._live_cancel(stream, live)
            return
        if live.worker is not None and stream.utterance is not None:
            await self._live_send(stream, live, stream.utterance)

    async def _live_claim(self, stream: SessionStream, live: LiveUplink) -> None:
        assert self.nc is not None
        agent = await self.agents.get(stream.device_id) if self.agents else None
        engine = (agent.asr_model if agent else None) or self._default_engine
        if engine not in self._streaming:
            live.over = True
            return
        body = json.dumps({"session_id": stream.session_id, "turn_id": live.turn_id, "device_id": stream.device_id}).encode()
        try:
            reply = json.loads((await self.nc.request(self.subjects.asr_live_claim, body, timeout=LIVE_CLAIM_TIMEOUT_S)).data)
        except Exception as exc:  # noqa: BLE001 - no ASR worker answered: the utterance goes whole
            LIVE.labels("unclaimed").inc()
            log.info("no ASR worker took the stream: %s", exc, extra={"session_id": stream.session_id})
            live.over = True
            return
        if not reply.get("ok"):
            LIVE.labels("unclaimed").inc()
            live.over = True
            return
        if live.over:  # the utterance was dropped while the claim was on its way
            await self._live_publish(stream, live, b"", {"Xz-Cancel": "1"})
            return
        live.worker = str(reply.get("worker_id") or "")
        if stream.utterance is not None and stream.live is live:
            await self._live_send(stream, live, stream.utterance)

    async def _live_publish(self, stream: SessionStream, live: LiveUplink, data: bytes, headers: dict[str, str]) -> None:
        try:
            await self.nc.publish(self.subjects.asr_live(stream.session_id, live.turn_id), data, headers=headers)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - the stream breaks; the work item still carries the audio
            ERRORS.labels("vad", "live_publish").inc()
            log.debug("live packet publish failed: %s", exc)

    async def _live_send(self, stream: SessionStream, live: LiveUplink, packets: list[bytes]) -> None:
        async with live.sending:
            while live.sent < len(packets):
                seq = live.sent
                live.sent += 1
                await self._live_publish(stream, live, packets[seq], {"Xz-Seq": str(seq)})

    async def _live_cancel(self, stream: SessionStream, live: LiveUplink) -> None:
        live.over = True
        if live.worker is not None:
            await self._live_publish(stream, live, b"", {"Xz-Cancel": "1"})
            LIVE.labels("cancelled").inc()

    async def _live_end(self, stream: SessionStream, packets: list[bytes]) -> tuple[str | None, str]:
        """The utterance ended: the rest of its packets and its end to the streaming worker.
        Returns its turn id and the worker's id ("" when it was not streamed)."""
        live, stream.live = stream.live, None
        if live is None or live.over:
            return None, ""
        live.over = True
        if live.worker is None:
            return live.turn_id, ""  # the claim is still on its way: it will be cancelled
        await self._live_send(stream, live, packets)
        async with live.sending:
            await self._live_publish(stream, live, b"", {"Xz-End": str(len(packets))})
        LIVE.labels("ended").inc()
        return live.turn_id, live.worker

    async def _tell_wake(self, stream: SessionStream) -> None:
        """The verdict on a wake word: the gateway greets (``wake_end``) or waits for the turn."""
        verdict, stream.wake_verdict = stream.wake_verdict, None
        if verdict is None or self.nc is None:
            return
        WAKES.labels(verdict).inc()
        with xlog.bind(session_id=stream.session_id):
            log.info("wake word verdict", extra={"fields": {"verdict": verdict, "speech_ms": round(stream.wake_speech_ms), "quiet_ms": round(stream.wake_quiet_ms)}})
        await self.nc.publish(self.subjects.out(stream.session_id), OutEvent(kind=f"wake_{verdict}", session_id=stream.session_id, turn_id="").encode())  # type: ignore[arg-type]

    async def _release_held(self, stream: SessionStream, all_of_them: bool = False) -> None:
        """Apply held control messages whose audio has been scored (or that waited too long)."""
        while stream.held:
            ctl = stream.held[0]
            if not all_of_them and stream.frames_seen < ctl.frames and time.monotonic() - stream.held_since <= HOLD_S:
                return
            stream.held.popleft()
            stream.held_since = time.monotonic()
            await self._apply_ctl(stream, ctl)

    async def _release_later(self, session_id: str) -> None:
        await asyncio.sleep(HOLD_S + 0.05)
        stream = self.streams.get(session_id)
        if stream is not None and stream.held and time.monotonic() - stream.held_since > HOLD_S:
            DROPPED.labels("vad", "control_held_too_long").inc()
            await self._release_held(stream, all_of_them=True)

    async def _on_ctl(self, session_id: str, msg: Msg) -> None:
        stream = self.streams.get(session_id)
        if stream is None:
            return
        try:
            ctl = Control.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("vad", "bad_control").inc()
            return
        stream.last_seen = time.monotonic()
        if ctl.kind != "close" and (stream.held or stream.frames_seen < ctl.frames):
            # Its audio is still on the way (another subscription's task): keep the order.
            if not stream.held:
                stream.held_since = time.monotonic()
                asyncio.create_task(self._release_later(session_id))
            stream.held.append(ctl)
            return
        await self._apply_ctl(stream, ctl)

    async def _apply_ctl(self, stream: SessionStream, ctl: Control) -> None:
        session_id = stream.session_id
        with xlog.bind(session_id=session_id):
            if ctl.kind == "listen_start":
                mode = ctl.mode or "auto"
                if stream.wake_pending and mode != "manual" and stream.wake_listens == 0:
                    # The device listens after its wake word: the utterance goes on.
                    stream.wake_listens += 1
                    stream.mode = mode
                else:
                    if stream.wake_pending:
                        # Push-to-talk after a wake word (greet, then listen), or the device
                        # listens again with no live audio heard since its wake word (it sent
                        # none; the gateway greeted without a verdict): the pre-roll is no part
                        # of what comes next.
                        stream._wake_end()
                    stream.reset()
                    stream.mode = mode
                    await self._tell_wake(stream)
                log.info("listening", extra={"fields": {"mode": stream.mode, "after_wake_word": stream.wake_pending}})
            elif ctl.kind == "listen_stop":
                packets = stream.stop()
                if packets:
                    await self._emit(stream, packets, "listen_stop", speech_end_ms=now_ms())
            elif ctl.kind == "detect" and ctl.wake:
                stream.begin_wake(ctl.text or "")
                log.info("wake word pre-roll", extra={"fields": {"text": ctl.text, "in_speech": stream.utterance is not None}})
                await self._tell_wake(stream)
            elif ctl.kind == "abort" and ctl.keep_speech:
                # A voice barge-in: the speech that interrupted (with its pre-roll) is the next turn.
                log.info("barge-in: keeping the utterance", extra={"fields": {"in_speech": stream.utterance is not None}})
            elif ctl.kind in ("detect", "abort"):
                # Typed text and audio around a button abort are not a user turn.
                stream.reset()
            elif ctl.kind == "close":
                await self._drop(session_id)

    async def _emit(self, stream: SessionStream, packets: list[bytes], reason: str, speech_end_ms: int) -> None:
        assert self.nc is not None
        live_turn, streamer = await self._live_end(stream, packets) if self._streaming else (None, "")
        turn_id = live_turn or new_turn_id()
        utterance = Utterance(session_id=stream.session_id, turn_id=turn_id, device_id=stream.device_id, speech_end_ms=speech_end_ms, wake_word=stream.wake_word if not stream.wake_pending else "", streamer=streamer)
        if not stream.wake_pending:
            stream.wake_word = ""  # only the utterance that began with it
        UTTERANCES.labels(reason).inc()
        with xlog.bind(session_id=stream.session_id, turn_id=turn_id):
            log.info("utterance", extra={"fields": {"frames": len(packets), "reason": reason, "seconds": round(len(packets) * stream.frame_ms / 1000, 2)}})
        out = self.subjects.out(stream.session_id)
        kind = "utterance"
        try:
            await publish_work(self.nc, self.subjects.asr(stream.session_id), utterance.pack(packets), self.settings.work.publish_timeout_s)
        except (StageBusy, StageUnavailable) as exc:
            busy = isinstance(exc, StageBusy)
            ERRORS.labels("vad", "asr_busy" if busy else "asr_unavailable").inc()
            log.warning("ASR queue refused the utterance: %s", exc)
            kind = "busy"
        try:
            # The gateway now waits for this turn's transcript (or hears that it was refused).
            await self.nc.publish(out, OutEvent(kind=kind, session_id=stream.session_id, turn_id=turn_id, speech_end_ms=speech_end_ms).encode())  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001
            ERRORS.labels("vad", "publish").inc()
            log.warning("utterance event publish failed: %s", exc)

    async def _drop(self, session_id: str) -> None:
        stream = self.streams.pop(session_id, None)
        if stream is None:
            return
        for sub in stream.subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
        SESSIONS.set(len(self.streams))
        with xlog.bind(session_id=session_id):
            log.info("released session")

    async def _gc(self) -> None:
        """Release sessions that went silent without a close (gateway died)."""
        while True:
            await asyncio.sleep(30)
            cutoff = time.monotonic() - 600
            for sid in [s for s, st in self.streams.items() if st.last_seen < cutoff]:
                await self._drop(sid)
