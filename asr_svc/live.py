"""Streaming ASR while the user speaks (docs/architecture.md, "Streaming ASR").

The VAD claims an ASR worker when an utterance starts and the device's agent uses a streaming
engine (``xz.asrs.claim``, queue group of the ASR workers). The worker that answers opens the
engine's stream and receives the utterance's Opus packets on ``xz.asrs.audio.<S>.<T>`` as they
are spoken (``Xz-Seq`` 0, 1, ...), then ``Xz-End`` with the packet count, or ``Xz-Cancel``. It
finishes the stream at the end; the final text waits here for the turn's work item, which
still goes through the ``XZ_ASR`` work queue as every utterance does (so a dead worker costs
the streaming, never the answer): the worker that pulls it takes the text from here, or asks
the streaming worker for it (``xz.asrs.result.<worker>``), and transcribes the whole utterance
when the stream is gone, had a gap, or its engine failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from prometheus_client import Counter

from asr_svc.engine import Transcript
from asr_svc.providers import AsrRequest, AsrStream, EngineError, EngineSet
from shared import logging as xlog
from shared.audio import OpusDecoder
from shared.metrics import DROPPED
from shared.settings import STREAMING_ASR_TYPES
from shared.subjects import QUEUE_ASR, Subjects

log = logging.getLogger("asr_svc.live")

HDR_SEQ = "Xz-Seq"
HDR_END = "Xz-End"
HDR_CANCEL = "Xz-Cancel"
KEEP_S = 60.0  # a streamed result nobody asked for is dropped after this

LIVE = Counter(
    "xz_asr_live_streams_total",
    "Utterances streamed to an engine while spoken, by outcome (streamed: the final text was used; refused: no stream opened; gap, cancelled, engine_failed, streamer_gone: the whole utterance was transcribed instead, or nothing was needed)",
    ["outcome"],
)
PARTIALS = Counter("xz_asr_partials_total", "Partial results streaming engines sent while the user spoke", ["engine"])


@dataclass
class Live:
    session_id: str
    turn_id: str
    engine: str
    stream: AsrStream
    decoder: OpusDecoder
    sub: Any = None
    next_seq: int = 0
    failed: str | None = None  # why the stream cannot give the final text
    error: str = ""
    reason: str = ""  # the engine's failure reason (EngineError.reason), when it failed
    result: asyncio.Task | None = None
    started: float = field(default_factory=time.monotonic)
    partials: int = 0


class StreamFailed(Exception):
    """No final text from the stream: ``reason`` is the LIVE outcome; ``engine_reason`` the
    engine's own failure (auth, timeout...) when the engine failed."""

    def __init__(self, reason: str, message: str = "", engine_reason: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.engine_reason = engine_reason


class LiveStreams:
    """This worker's streams, and its part in the protocol above."""

    def __init__(self, nc: Any, subjects: Subjects, engines: EngineSet, agents: Any, worker_id: str) -> None:
        self.nc = nc
        self.subjects = subjects
        self.engines = engines
        self.agents = agents
        self.worker_id = worker_id
        self.live: dict[str, Live] = {}
        self._subs: list[Any] = []
        self._gc: asyncio.Task | None = None

    async def start(self) -> None:
        self._subs = [
            await self.nc.subscribe(self.subjects.asr_live_claim, queue=QUEUE_ASR, cb=self._on_claim),
            await self.nc.subscribe(self.subjects.asr_live_result(self.worker_id), cb=self._on_result_request),
        ]
        self._gc = asyncio.create_task(self._collect_garbage())

    async def stop(self) -> None:
        if self._gc:
            self._gc.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
        for entry in list(self.live.values()):
            await self._drop(entry)

    async def _on_claim(self, msg: Msg) -> None:
        try:
            claim = json.loads(msg.data)
            session_id, turn_id, device_id = str(claim["session_id"]), str(claim["turn_id"]), str(claim.get("device_id") or "")
        except (ValueError, KeyError, TypeError):
            DROPPED.labels("asr", "bad_live_claim").inc()
            return
        with xlog.bind(session_id=session_id, turn_id=turn_id):
            agent = await self.agents.get(device_id)
            name = self.engines.choose(agent.asr_model if agent else None)
            cfg = self.engines.configs.get(name)
            if cfg is None or cfg.type not in STREAMING_ASR_TYPES:
                await self._answer(msg, {"ok": False, "why": "not a streaming engine"})
                return
            request = AsrRequest(language=agent.language if agent and agent.language != "auto" else None, detect=bool(agent and agent.language == "auto"), hotwords=list(agent.asr_hotwords) if agent else [], session_id=session_id, turn_id=turn_id)
            try:
                engine = await self.engines.get(name)
                holder: dict[str, Live] = {}

                async def on_partial(text: str) -> None:
                    PARTIALS.labels(name).inc()
                    entry = holder.get("entry")
                    if entry is not None:
                        entry.partials += 1
                    log.debug("partial", extra={"fields": {"engine": name, "text": text}})

                stream = await asyncio.wait_for(engine.open_stream(request, on_partial), engine.timeout_s)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - no stream: the whole utterance goes the usual way
                LIVE.labels("refused").inc()
                log.warning("streaming ASR did not open", extra={"fields": {"engine": name, "error": str(exc)[:300]}})
                await self._answer(msg, {"ok": False, "why": "engine"})
                return
            entry = Live(session_id, turn_id, name, stream, OpusDecoder(16000))
            holder["entry"] = entry
            self.live[turn_id] = entry

            async def on_packet(m: Msg, e: Live = entry) -> None:
                await self._on_packet(e, m)

            entry.sub = await self.nc.subscribe(self.subjects.asr_live(session_id, turn_id), cb=on_packet, pending_msgs_limit=2000)
            await self._answer(msg, {"ok": True, "worker_id": self.worker_id})
            log.info("streaming the utterance", extra={"fields": {"engine": name}})

    async def _answer(self, msg: Msg, body: dict) -> None:
        try:
            await msg.respond(json.dumps(body).encode())
        except Exception as exc:  # noqa: BLE001
            log.debug("live claim answer failed: %s", exc)

    async def _on_packet(self, entry: Live, msg: Msg) -> None:
        headers = msg.headers or {}
        if entry.failed or entry.result is not None:
            return
        if HDR_CANCEL in headers:
            entry.failed = "cancelled"
            await self._drop(entry)
            return
        if HDR_END in headers:
            try:
                count = int(headers[HDR_END])
            except ValueError:
                count = -1
            if count != entry.next_seq:
                await self._fail(entry, "gap", f"{entry.next_seq} of {count} packets")
                return
            await self._unsubscribe(entry)
            entry.result = asyncio.create_task(self._finish(entry))
            return
        try:
            seq = int(headers.get(HDR_SEQ, ""))
        except ValueError:
            seq = -1
        if seq != entry.next_seq:
            await self._fail(entry, "gap", f"packet {seq} where {entry.next_seq} was due")
            return
        entry.next_seq += 1
        try:
            pcm = entry.decoder.decode(msg.data)
        except Exception:  # noqa: BLE001 - a packet the decoder refuses: what the VAD kept too
            DROPPED.labels("asr", "bad_opus").inc()
            return
        try:
            await entry.stream.send(pcm)
        except Exception as exc:  # noqa: BLE001 - the engine broke mid-utterance
            entry.reason = exc.reason if isinstance(exc, EngineError) else "error"
            await self._fail(entry, "engine_failed", str(exc)[:300])

    async def _fail(self, entry: Live, why: str, error: str) -> None:
        """The stream can give no final text (the turn's audio is transcribed whole instead)."""
        entry.failed, entry.error = why, error
        await self._unsubscribe(entry)
        await entry.stream.cancel()

    async def _finish(self, entry: Live) -> Transcript:
        engine = await self.engines.get(entry.engine)
        try:
            return await asyncio.wait_for(entry.stream.finish(), engine.timeout_s)
        except asyncio.TimeoutError as exc:
            await entry.stream.cancel()
            raise EngineError("timeout", f"no final text within {engine.timeout_s:g} s of the end") from exc

    async def _unsubscribe(self, entry: Live) -> None:
        if entry.sub is not None:
            try:
                await entry.sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
            entry.sub = None

    async def _drop(self, entry: Live) -> None:
        self.live.pop(entry.turn_id, None)
        await self._unsubscribe(entry)
        if entry.result is None:
            try:
                await entry.stream.cancel()
            except Exception:  # noqa: BLE001
                pass
        elif not entry.result.done():
            entry.result.cancel()
        if entry.failed == "cancelled":
            LIVE.labels("cancelled").inc()

    async def own_result(self, turn_id: str, timeout_s: float) -> Transcript:
        """The final text of a stream this worker holds; StreamFailed when there is none."""
        deadline = time.monotonic() + timeout_s
        entry = self.live.get(turn_id)
        # The work item can overtake the stream's last packets and its end: wait for them.
        while entry is not None and entry.result is None and entry.failed is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if entry is None:
            raise StreamFailed("streamer_gone", "no such stream here")
        try:
            if entry.failed:
                raise StreamFailed(entry.failed, entry.error, entry.reason)
            if entry.result is None:
                raise StreamFailed("gap", "the stream never ended")
            try:
                return await asyncio.wait_for(asyncio.shield(entry.result), max(0.1, deadline - time.monotonic()))
            except EngineError as exc:
                raise StreamFailed("engine_failed", str(exc), exc.reason) from exc
            except asyncio.TimeoutError as exc:
                raise StreamFailed("engine_failed", "no final text in time", "timeout") from exc
            except Exception as exc:  # noqa: BLE001 - the engine broke at the end
                raise StreamFailed("engine_failed", str(exc)[:300], "error") from exc
        finally:
            self.live.pop(turn_id, None)

    async def result(self, streamer: str, turn_id: str, timeout_s: float) -> Transcript:
        """A streamed turn's final text, from this worker or the one that streamed it."""
        if streamer == self.worker_id:
            return await self.own_result(turn_id, timeout_s)
        try:
            reply = await self.nc.request(self.subjects.asr_live_result(streamer), json.dumps({"turn_id": turn_id}).encode(), timeout=timeout_s)
            body = json.loads(reply.data)
        except Exception as exc:  # noqa: BLE001 - no answer: that worker is gone
            raise StreamFailed("streamer_gone", str(exc)[:200]) from exc
        if "error" in body:
            raise StreamFailed(str(body.get("reason") or "engine_failed"), str(body["error"]), str(body.get("engine_reason") or ""))
        return Transcript(text=str(body.get("text", "")), language=body.get("language"), audio_s=float(body.get("audio_s") or 0.0))

    async def _on_result_request(self, msg: Msg) -> None:
        try:
            turn_id = str(json.loads(msg.data)["turn_id"])
        except (ValueError, KeyError, TypeError):
            DROPPED.labels("asr", "bad_live_request").inc()
            return
        engine_timeout = 15.0
        entry = self.live.get(turn_id)
        if entry is not None:
            engine_timeout = (await self.engines.get(entry.engine)).timeout_s
        try:
            transcript = await self.own_result(turn_id, engine_timeout)
            body: dict = {"text": transcript.text, "language": transcript.language, "audio_s": transcript.audio_s}
        except StreamFailed as exc:
            body = {"error": str(exc), "reason": exc.reason, "engine_reason": exc.engine_reason}
        await self._answer(msg, body)

    async def _collect_garbage(self) -> None:
        while True:
            await asyncio.sleep(10)
            now = time.monotonic()
            for entry in [e for e in self.live.values() if now - e.started > KEEP_S]:
                await self._drop(entry)
