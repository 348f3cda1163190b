"""The LLM worker: user turn in; stt, emotion and numbered sentences out, as early as possible.

For each turn it echoes the user text (``stt``) to the gateway, streams the model's answer
through the sentence splitter, and sends each sentence to TTS with the turn id and a sequence
number. Tool calls go to tools_svc over NATS; a result marked ``response`` is spoken directly,
one marked ``reqllm`` is fed back to the model for another round. An abort for the turn
cancels the generation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import re
import threading
import time
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from llm_svc.backends import ANSWERED_BY, MODEL_OVERRIDE, BackendError, LlmBackend, ToolCallRequest, make_backend, provider_settings
from llm_svc.memory import MemoryStore
from llm_svc.prompt import system_prompt
from llm_svc.sentences import SentenceSplitter, detect_emotion, speakable
from llm_svc.tools import ToolClient, relevant_tools
from shared.phrases import phrase
from shared import logging as xlog
from shared.agents import AgentConfig, load_agent, open_bucket
from shared.messages import Control, OutEvent, SentenceJob, SessionEnd, UserTurn, new_turn_id
from shared.metrics import DROPPED, ERRORS, histogram
from shared.settings import Settings
from shared.subjects import QUEUE_LLM, Subjects
from shared.workqueue import StageBusy, StageUnavailable, WorkPuller, publish_work

log = logging.getLogger("llm_svc")

FIRST_TOKEN = histogram("xz_llm_first_token_seconds", "Turn received to first token")
FIRST_SENTENCE = histogram("xz_llm_first_sentence_seconds", "Turn received to first sentence sent to TTS")
TURN_SECONDS = histogram("xz_llm_turn_seconds", "Turn received to last sentence sent")
TOKENS = Counter("xz_llm_tokens_total", "Text deltas streamed from the backend")
TURNS = Counter("xz_llm_turns_total", "Turns handled, by outcome", ["outcome"])
TOOL_CALLS = Counter("xz_llm_tool_calls_total", "Tool calls requested by the model, by tool and outcome", ["tool", "outcome"])
IN_FLIGHT = Gauge("xz_llm_in_flight", "Turns being answered now")


class TurnContext:
    """What one turn has produced so far: the sequence counter and the spoken text."""

    def __init__(self, turn: UserTurn) -> None:
        self.turn = turn
        self.seq = 0
        self.spoken: list[str] = []
        self.emotion_sent = False
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.cancel = threading.Event()
        self.close_after = False
        self.agent = AgentConfig()
        self.backend: LlmBackend | None = None  # the agent's (llm.providers), else the default
        # The TTS queue refused a sentence: the turn stops there and the gateway is told.
        self.refused = False


class LlmWorker:
    name = "llm"

    def __init__(self, settings: Settings, backend: LlmBackend | None = None) -> None:
        self.settings = settings
        self.llm = settings.llm
        self.subjects = Subjects(settings.nats.prefix)
        self.backend = backend or make_backend(self.llm)
        # The default backend and the agents' choices from llm.providers, started on first use.
        self.backends: dict[str, LlmBackend] = {"default": self.backend}
        self._starting = asyncio.Lock()
        self.memory = MemoryStore(self.subjects.kv_memory, self.llm.history_turns, settings.work.replicas)
        self.agents_kv: Any = None
        self.nc: NATS | None = None
        self.tools: ToolClient | None = None
        self._puller: WorkPuller | None = None
        self._end_sub = None
        self._ctl_sub = None
        # Turns cancelled and sessions closed, as seen on xz.ctl.* (bounded, oldest dropped).
        self._cancelled: dict[str, None] = {}
        self._closed_sessions: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._exit_commands = {self._norm(c) for c in self.llm.exit_commands}

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        await self.memory.open(nc)
        self.agents_kv = await open_bucket(nc, self.subjects.kv_agents, self.settings.work.replicas)
        self.tools = ToolClient(nc, self.subjects, self.llm.tool_timeout_s)
        self._end_sub = await nc.subscribe(self.subjects.session_end, queue=QUEUE_LLM, cb=self._on_session_end)
        self._ctl_sub = await nc.subscribe(self.subjects.ctl("*"), cb=self._watch_ctl)
        concurrency = self.settings.work.llm.concurrency or (1 if self.backend.name == "llamacpp" else 16)
        self._puller = WorkPuller(nc, self.subjects, "llm", self.settings.work, self._on_work, concurrency, "llm")
        await self._puller.start()

    async def stop(self) -> None:
        if self._puller is not None:
            await self._puller.stop(self.settings.nats.drain_timeout_s)
        for sub in (self._end_sub, self._ctl_sub):
            if sub is not None:
                await sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.nats.drain_timeout_s)
        for backend in self.backends.values():
            await backend.close()

    def health(self) -> dict[str, Any]:
        return {"ok": True, "backend": self.backend.name, "backends": sorted(self.backends), "in_flight": len(self._tasks)}

    async def _backend_for(self, name: str | None) -> LlmBackend:
        """The backend an agent chose (a name from llm.providers), started at its first turn."""
        if not name or name == "default":
            return self.backend
        backend = self.backends.get(name)
        if backend is not None:
            return backend
        if name not in self.llm.providers:
            ERRORS.labels("llm", "unknown_backend").inc()
            log.warning("agent names an LLM backend this worker does not have: %s (using the default)", name)
            return self.backend
        async with self._starting:
            backend = self.backends.get(name)
            if backend is None:
                try:
                    backend = await asyncio.to_thread(make_backend, provider_settings(self.llm, name))
                except Exception as exc:  # noqa: BLE001 - a bad provider config: the turn says sorry
                    raise BackendError(f"LLM backend {name} did not start: {exc}") from exc
                self.backends[name] = backend
                log.info("LLM backend started", extra={"fields": {"backend": name, "kind": backend.name}})
        return backend

    def queue_depths(self) -> dict[str, int]:
        """Turns waiting in the stage's queue, and inside this worker for the model (a backend
        that batches, like vLLM, has no such wait)."""
        return {"llm": self._puller.backlog if self._puller else 0, "model": sum(int(getattr(b, "waiting", 0)) for b in self.backends.values())}

    async def _on_work(self, msg: Msg, delivery: int) -> None:
        """One user turn from the queue; the slot stays taken until the answer is queued.

        A redelivered turn (its first worker died mid-answer) is answered again from the start
        under a new turn id: its ``stt`` makes the gateway drop whatever the dead worker had
        queued and play the new answer whole, rather than splice two different answers.
        """
        try:
            turn = UserTurn.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("llm", "bad_turn").inc()
            return
        if delivery > 1 and turn.source != "idle":
            # (An idle farewell's turn was opened by the gateway itself: it keeps its id.)
            with xlog.bind(session_id=turn.session_id, turn_id=turn.turn_id):
                retry_id = new_turn_id()
                log.warning("answering a redelivered turn afresh", extra={"fields": {"new_turn_id": retry_id, "delivery": delivery}})
            turn.turn_id = retry_id
        if self._cancelled_before_start(turn):
            with xlog.bind(session_id=turn.session_id, turn_id=turn.turn_id):
                log.info("turn was cancelled while it waited in the queue; skipped")
            TURNS.labels("cancelled").inc()
            return
        task = asyncio.create_task(self._answer(turn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    def _cancelled_before_start(self, turn: UserTurn) -> bool:
        """Superseded, aborted or closed while it waited in the queue (seen on xz.ctl.*)."""
        if turn.turn_id in self._cancelled:
            return True
        closed_at = self._closed_sessions.get(turn.session_id)
        return closed_at is not None and turn.source != "idle"

    async def _watch_ctl(self, msg: Msg) -> None:
        """Every session's control messages, to know of turns cancelled before they start."""
        try:
            ctl = Control.decode(msg.data)
        except Exception:  # noqa: BLE001
            return
        if ctl.kind in ("cancel", "abort") and ctl.turn_id:
            self._cancelled[ctl.turn_id] = None
            while len(self._cancelled) > 10000:
                self._cancelled.pop(next(iter(self._cancelled)))
        elif ctl.kind == "close":
            self._closed_sessions[ctl.session_id] = time.monotonic()
            while len(self._closed_sessions) > 10000:
                self._closed_sessions.pop(next(iter(self._closed_sessions)))

    async def _answer(self, turn: UserTurn) -> None:
        assert self.nc is not None
        ctx = TurnContext(turn)
        out = self.subjects.out(turn.session_id)
        with xlog.bind(session_id=turn.session_id, turn_id=turn.turn_id):
            IN_FLIGHT.inc()
            async def on_ctl(m: Msg) -> None:
                self._on_ctl(ctx, m)

            ctl_sub = await self.nc.subscribe(self.subjects.ctl(turn.session_id), cb=on_ctl)
            try:
                if turn.source != "idle":
                    # An idle farewell has no user text: the gateway started that turn itself.
                    await self.nc.publish(out, OutEvent(kind="stt", session_id=turn.session_id, turn_id=turn.turn_id, text=turn.text, speech_end_ms=turn.speech_end_ms).encode())
                log.info("turn", extra={"fields": {"text": turn.text, "source": turn.source}})
                if self._is_exit_command(turn.text):
                    log.info("exit command: closing the session")
                    ctx.close_after = True
                    outcome = "exit_command"
                else:
                    outcome = await self._converse(ctx)
                    if ctx.seq == 0 and not ctx.cancel.is_set() and not ctx.close_after:
                        # Nothing speakable came out (a small model may answer with an emoji
                        # alone): say so rather than leave the device silent.
                        log.warning("the model produced nothing to speak")
                        outcome = "empty"
                        await self._speak(ctx, self._error_reply(ctx))
                TURNS.labels(outcome).inc()
            except Exception:  # noqa: BLE001 - never leave the device without an ending
                ERRORS.labels("llm", "turn").inc()
                TURNS.labels("error").inc()
                log.exception("turn failed")
                if not ctx.cancel.is_set():
                    await self._speak(ctx, self._error_reply(ctx))
            finally:
                try:
                    await ctl_sub.unsubscribe()
                except Exception:  # noqa: BLE001
                    pass
                IN_FLIGHT.dec()
            if ctx.refused:
                # Say "busy" (nothing played yet) or end the reply after what was queued.
                kind = "busy" if ctx.seq == 0 else "turn_end"
                await self.nc.publish(out, OutEvent(kind=kind, session_id=turn.session_id, turn_id=turn.turn_id, sentences=ctx.seq).encode())
                return
            if ctx.cancel.is_set():
                log.info("turn aborted")
                return
            await self._ensure_emotion(ctx, "")
            await self.nc.publish(out, OutEvent(kind="turn_end", session_id=turn.session_id, turn_id=turn.turn_id, sentences=ctx.seq, close_after=ctx.close_after).encode())
            TURN_SECONDS.observe(time.perf_counter() - ctx.started)
            reply = " ".join(ctx.spoken)
            log.info("reply", extra={"fields": {"sentences": ctx.seq, "text": reply[:300], "seconds": round(time.perf_counter() - ctx.started, 3), "model": ANSWERED_BY.get()}})
            if reply and turn.source != "idle" and ctx.agent.memory != "none":
                await self.memory.add_turn(self._memory_key(turn), turn.text, reply)
            if turn.device_id and turn.source != "idle":
                await self._publish_history(turn, reply)

    async def _publish_history(self, turn: UserTurn, reply: str) -> None:
        """The turn's texts for the owner's chat history (the manager keeps bound devices')."""
        event = {"device_id": turn.device_id, "session_id": turn.session_id, "turn_id": turn.turn_id, "user": turn.text, "assistant": reply, "audio": turn.audio, "at": time.time()}
        try:
            await self.nc.publish(self.subjects.history, json.dumps(event).encode())
        except Exception as exc:  # noqa: BLE001 - history is best effort; the turn is done
            ERRORS.labels("llm", "history_publish").inc()
            log.warning("history not published: %s", exc)

    @staticmethod
    def _on_ctl(ctx: TurnContext, msg: Msg) -> None:
        """An abort of this turn (or the session closing) cancels the generation."""
        try:
            ctl = Control.decode(msg.data)
        except Exception:  # noqa: BLE001
            return
        if ctl.kind == "close" or (ctl.kind == "abort" and ctl.turn_id in (None, ctx.turn.turn_id)) or (ctl.kind == "cancel" and ctl.turn_id == ctx.turn.turn_id):
            ctx.cancel.set()

    async def _converse(self, ctx: TurnContext) -> str:
        """Run the model (and its tool rounds) for one turn; returns the outcome label."""
        turn = ctx.turn
        ctx.agent = agent = await load_agent(self.agents_kv, turn.device_id)
        # This turn's task only: the agent's model for an OpenAI-compatible server.
        MODEL_OVERRIDE.set(agent.llm_model)
        ANSWERED_BY.set(None)
        try:
            ctx.backend = backend = await self._backend_for(agent.llm_backend)
        except BackendError as exc:
            ERRORS.labels("llm", "backend").inc()
            log.error("backend failed: %s", exc)
            await self._speak(ctx, self._error_reply(ctx))
            return "backend_error"
        memory = await self.memory.load(self._memory_key(turn)) if agent.memory != "none" else None
        prompt = system_prompt(
            self.llm.system_prompt,
            agent,
            dt.datetime.now().astimezone(),
            language=turn.language,
            summary=memory.summary if memory is not None and agent.memory == "summary" else "",
            emoji=self.llm.emoji_prompt,
        )
        messages: list[dict[str, Any]] = [{"role": "system", "content": prompt}]
        if memory is not None:
            messages += memory.turns
        log.info(
            "prompt",
            extra={
                "fields": {
                    "agent": agent.name,
                    # Which role prompt this turn used (a digest: the prompt itself is the owner's).
                    "role_sha": hashlib.sha256((agent.role_prompt or "").encode()).hexdigest()[:12] if agent.role_prompt else None,
                    "memory": agent.memory,
                    "remembered_messages": len(memory.turns) if memory else 0,
                    "summary": bool(memory and memory.summary),
                }
            },
        )
        offered = []
        if turn.source == "idle":
            ctx.close_after = True
            if self.llm.farewell_text:
                await self._speak(ctx, phrase("farewell", self._language(ctx), self.llm.farewell_text))
                return "farewell"
            # As a user message: small models follow it there rather than read it out.
            messages.append({"role": "user", "content": self.llm.end_prompt})
        else:
            messages.append({"role": "user", "content": turn.text})
        if self.llm.tools and self.llm.intent_mode != "none" and self.tools is not None and turn.source != "idle":
            available = await self.tools.available(turn.session_id, turn.device_id)
            if agent.tools is not None:
                device = set(self.tools.device_tool_names(turn.session_id))
                available = [t for t in available if t.name in agent.tools or t.name in device]
            offered = relevant_tools(turn.text, available)
        known = {t.name for t in offered}
        for round_no in range(self.llm.max_tool_rounds + 1):
            tools = offered if round_no < self.llm.max_tool_rounds else []

            splitter = SentenceSplitter()
            calls: list[ToolCallRequest] = []
            try:
                if self.llm.intent_mode == "intent_llm" and tools:
                    # A separate classification step picks the tool; the answer comes without tools.
                    chosen = await backend.classify(messages, tools)
                    tools = []
                    if chosen is not None:
                        calls.append(chosen)
                if not calls:
                    async for delta in self._stream_with_retry(messages, tools, ctx):
                        if ctx.cancel.is_set():
                            return "aborted"
                        if isinstance(delta, ToolCallRequest):
                            calls.append(delta)
                            continue
                        if ctx.first_token_at is None:
                            ctx.first_token_at = time.perf_counter()
                            FIRST_TOKEN.observe(ctx.first_token_at - ctx.started)
                        TOKENS.inc()
                        for sentence in splitter.push(delta):
                            await self._speak(ctx, sentence, splitter.raw)
            except BackendError as exc:
                ERRORS.labels("llm", "backend").inc()
                log.error("backend failed: %s", exc)
                await self._speak(ctx, self._error_reply(ctx))
                return "backend_error"
            for sentence in splitter.flush():
                await self._speak(ctx, sentence, splitter.raw)
            if not calls or ctx.cancel.is_set():
                return "aborted" if ctx.cancel.is_set() else "ok"
            feed_back = False
            messages.append({
                "role": "assistant",
                "content": splitter.raw or None,
                "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls],
            })
            # The emotion goes first: a tool may put its own sentences into the turn.
            await self._ensure_emotion(ctx, "")
            for call in calls:
                assert self.tools is not None
                result = await self.tools.call(
                    call.name, call.arguments, turn.session_id, turn.turn_id, turn.device_id,
                    seq=ctx.seq, sample_rate=self.settings.gateway.sample_rate, frame_duration=self.settings.gateway.frame_duration,
                    voice=ctx.agent.voice or self.llm.voice, engine=ctx.agent.tts_engine, language=self._language(ctx), utterance=turn.text,
                    on_progress=lambda: self._keep_alive(ctx),
                )
                ctx.seq += max(0, result.seqs_used)
                # Label by tool only for tools that exist: a model can invent any name.
                TOOL_CALLS.labels(call.name if call.name in known else "unknown", "ok" if result.ok else "error").inc()
                log.info("tool result", extra={"fields": {"tool": call.name, "arguments": call.arguments, "ok": result.ok, "action": result.action, "text": result.text[:200]}})
                messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result.text})
                if result.close_after and result.ok:
                    ctx.close_after = True
                if result.action == "response" and result.ok:
                    await self._speak(ctx, result.text)
                elif result.action in ("reqllm", "error"):
                    feed_back = True
            if not feed_back:
                return "ok"
            # The next round answers with the results. A tool already called this turn is not
            # offered again, so a model that keeps calling cannot loop.
            called = {c.name for c in calls}
            offered = [t for t in offered if t.name not in called]
        return "ok"

    async def _stream_with_retry(self, messages: list[dict[str, Any]], tools: list, ctx: TurnContext):
        """Stream from the backend; retry once on a transient error before any output."""
        attempt = 0
        while True:
            produced = False
            try:
                async for delta in (ctx.backend or self.backend).stream(messages, tools, ctx.cancel):
                    produced = True
                    yield delta
                return
            except BackendError as exc:
                if exc.transient and not produced and attempt == 0:
                    attempt += 1
                    log.warning("transient backend error, retrying: %s", exc)
                    await asyncio.sleep(0.2)
                    continue
                raise

    @staticmethod
    def _norm(text: str) -> str:
        return re.sub(r"[\W_]+", "", text).lower()

    def _is_exit_command(self, text: str) -> bool:
        return bool(text) and self._norm(text) in self._exit_commands

    @staticmethod
    def _memory_key(turn: UserTurn) -> str:
        return turn.device_id or turn.session_id

    async def _on_session_end(self, msg: Msg) -> None:
        """A session closed: with summary memory, fold the conversation into a short summary."""
        try:
            end = SessionEnd.decode(msg.data)
        except Exception:  # noqa: BLE001
            DROPPED.labels("llm", "bad_session_end").inc()
            return
        if self.tools is not None:
            self.tools.forget(end.session_id)
        agent = await load_agent(self.agents_kv, end.device_id)
        if agent.memory != "summary" or not end.device_id:
            return
        key = end.device_id
        memory = await self.memory.load(key)
        if not memory.turns:
            return
        transcript = "\n".join(f"{m['role']}: {m['content']}" for m in memory.turns)
        request = [
            {"role": "system", "content": self.llm.summary_prompt},
            {"role": "user", "content": (f"Earlier summary: {memory.summary}\n" if memory.summary else "") + f"Conversation:\n{transcript}"},
        ]
        text = ""
        MODEL_OVERRIDE.set(agent.llm_model)
        try:
            backend = await self._backend_for(agent.llm_backend)
            async for delta in backend.stream(request, [], threading.Event()):
                if isinstance(delta, str):
                    text += delta
        except BackendError as exc:
            log.warning("summary failed: %s", exc, extra={"session_id": end.session_id})
            return
        memory.summary = speakable(text)[:1000]
        await self.memory.save(key, memory)
        log.info("memory summary written", extra={"session_id": end.session_id, "fields": {"device_id": end.device_id, "summary": memory.summary[:200]}})

    async def _keep_alive(self, ctx: TurnContext) -> None:
        """A slow server tool is still working: tell the gateway, whose turn watchdog would
        otherwise end the turn (`gateway.turn_timeout_s`) before the tool's answer."""
        assert self.nc is not None
        turn = ctx.turn
        try:
            await self.nc.publish(self.subjects.out(turn.session_id), OutEvent(kind="progress", session_id=turn.session_id, turn_id=turn.turn_id).encode())
        except Exception as exc:  # noqa: BLE001 - a lost keep-alive costs at most a sorry
            log.debug("keep-alive publish failed: %s", exc)

    async def _ensure_emotion(self, ctx: TurnContext, text: str) -> None:
        if ctx.emotion_sent:
            return
        ctx.emotion_sent = True
        assert self.nc is not None
        turn = ctx.turn
        await self.nc.publish(
            self.subjects.out(turn.session_id),
            OutEvent(kind="emotion", session_id=turn.session_id, turn_id=turn.turn_id, emotion=detect_emotion(text)).encode(),
        )

    @staticmethod
    def _language(ctx: TurnContext) -> str | None:
        """The reply's language: the agent's, else the one the ASR heard."""
        language = ctx.agent.language
        return ctx.turn.language if language in (None, "auto") else language

    def _error_reply(self, ctx: TurnContext) -> str:
        return phrase("sorry", self._language(ctx), self.llm.error_reply)

    async def _speak(self, ctx: TurnContext, sentence: str, raw: str = "") -> None:
        """Send one sentence to TTS with the next sequence number."""
        sentence = speakable(sentence)
        if not sentence or ctx.cancel.is_set():
            return
        assert self.nc is not None
        await self._ensure_emotion(ctx, raw or sentence)
        turn = ctx.turn
        if ctx.seq == 0:
            FIRST_SENTENCE.observe(time.perf_counter() - ctx.started)
        job = SentenceJob(session_id=turn.session_id, turn_id=turn.turn_id, seq=ctx.seq, text=sentence, voice=ctx.agent.voice or self.llm.voice, engine=ctx.agent.tts_engine, language=self._language(ctx), sample_rate=self.settings.gateway.sample_rate, frame_duration=self.settings.gateway.frame_duration)
        try:
            await publish_work(self.nc, self.subjects.tts(turn.session_id), job.encode(), self.settings.work.publish_timeout_s)
        except (StageBusy, StageUnavailable) as exc:
            ERRORS.labels("llm", "tts_busy" if isinstance(exc, StageBusy) else "tts_unavailable").inc()
            log.warning("TTS queue refused a sentence; ending the turn: %s", exc, extra={"fields": {"seq": ctx.seq}})
            ctx.refused = True
            ctx.cancel.set()
            return
        ctx.seq += 1
        ctx.spoken.append(sentence)
