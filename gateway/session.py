"""One device connection: hello, listen/abort handling, uplink to NATS, downlink from NATS."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import deque
from typing import Any, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway import auth, firmware, glyphs, iot, mcp, protocol
from gateway import metrics as m
from gateway.downlink import PacedSender
from gateway.turns import Flush, Stop, TurnAssembler
from shared import logging as xlog
from shared.agents import AgentConfig, AgentDirectory
from shared.phrases import phrase
from shared.messages import (
    HDR_RECEIVED,
    AudioFrameMeta,
    Control,
    DeviceMcpReply,
    DeviceMcpRequest,
    DeviceTool,
    OutEvent,
    SentenceJob,
    SessionEnd,
    UserTurn,
    VadClaim,
    VadClaimAck,
    new_turn_id,
)
from shared.settings import GatewaySettings, WorkSettings
from shared.subjects import Subjects
from shared.workqueue import StageBusy, StageUnavailable, publish_work

log = logging.getLogger("gateway.session")

_PUNCT = re.compile(r"[\s\.,!?;:，。！？；：、~～\"'“”‘’]+")


def normalise_wake_word(text: str) -> str:
    return _PUNCT.sub("", text).lower()


# One uplink frame in this many carries the time the gateway received it.
UPLINK_LAG_SAMPLE = 8
# The firmware's wake-word pre-roll (up to 2 s of buffered audio) comes as a burst right before
# `listen detect`: frames in the last PREROLL_WINDOW_S carrying well more audio than wall time.
PREROLL_WINDOW_S = 1.0
PREROLL_MIN_FRAMES = 5


class DeviceSession:
    """State that must live next to the socket: hello, listen mode, turns, paced downlink."""

    def __init__(
        self,
        ws: ServerConnection,
        nc: NATS,
        settings: GatewaySettings,
        subjects: Subjects,
        device_id: str,
        client_id: str,
        version: int,
        auth_key: str = "",
        vision_url: str | None = None,
        work: WorkSettings | None = None,
        admit_turn: Callable[[], bool] | None = None,
        agents: AgentDirectory | None = None,
        firmware_version: str | None = None,
    ) -> None:
        self.ws = ws
        self.agents = agents  # shared by the gateway's sessions
        self.nc = nc
        self.settings = settings
        self.work = work or WorkSettings()
        self._admit_turn = admit_turn or (lambda: True)
        # Over the turn rate limit: uplink audio is not forwarded until then (monotonic).
        self._muted_until = 0.0
        self.subjects = subjects
        self.device_id = device_id
        self.client_id = client_id
        self.version = version
        self.session_id = str(uuid.uuid4())
        self.connected_at = time.time()
        self.hello: protocol.Hello | None = None
        self.mode = "auto"
        self.assembler = TurnAssembler()
        self.downlink = PacedSender(
            self._send,
            self.session_id,
            version,
            settings.frame_duration / 1000,
            settings.prebuffer_frames,
            settings.stop_tail_ms / 1000,
            on_first_audio=self._first_audio,
            on_stop=self._reply_done,
            start_gap_s=settings.start_gap_ms / 1000,
            start_wait_max_s=settings.start_wait_max_ms / 1000,
            start_quiet_frames=settings.start_quiet_frames,
        )
        self.firmware_version: str | None = None
        self._use_firmware_version(firmware_version)
        self._out_sub = None
        # Uplink (audio and control) goes through one ordered queue, published once a VAD
        # worker owns the session, so nothing sent before the claim completes is lost.
        self._claim_done = asyncio.Event()
        self._claimed = False
        # Which VAD worker owns the session, since when; the server watches its heartbeats.
        self.vad_owner: str | None = None
        self.vad_claimed_at = 0.0
        # The VAD heard speech start and no utterance came of it yet.
        self._speech_open_at: float | None = None
        self._uplink: asyncio.Queue[tuple[str, bytes | Control, bool, float]] = asyncio.Queue(maxsize=256)
        self._uplink_frames = 0
        # Audio frames published to the VAD owner since it claimed the session: control messages
        # carry the count, so the VAD applies them after the audio sent before them.
        self._audio_published = 0
        # Arrival times of recent uplink frames, to tell the wake word's pre-roll burst.
        self._frame_arrivals: deque[float] = deque(maxlen=64)
        # After a wake word with its pre-roll: the VAD's verdict (`wake_end` or `wake_more`).
        self._wake_verdict: asyncio.Future | None = None
        # After a "more" verdict, until its utterance is heard (or this deadline): a transcript
        # with nothing to answer (the wake word alone, noise) gets the greeting, not silence.
        self._greet_if_discarded_until = 0.0
        self._claim_task: asyncio.Task | None = None
        self._pump_task: asyncio.Task | None = None
        self._closing = False
        self._last_turn_activity = time.monotonic()
        # Idle tracking (protocol.md §6.8): last voice (speech, text, a reply), last uplink frame.
        self._last_voice = time.monotonic()
        self._last_frame = 0.0
        self._farewell_sent = False
        self._listening = asyncio.Event()
        self._greeting_task: asyncio.Task | None = None
        self._turn_started_at: dict[str, float] = {}
        self._speech_end_ms: dict[str, int] = {}
        # Utterances the VAD queued for ASR whose transcript has not come yet: turn -> deadline.
        self._awaiting_stt: dict[str, float] = {}
        self._watchdog: asyncio.Task | None = None
        self._wake_words = {normalise_wake_word(w) for w in settings.wake_words}
        self.auth_key = auth_key
        self.vision_url = vision_url
        self.mcp = mcp.McpState()
        self.iot = iot.IotState()
        self._mcp_listed = asyncio.Event()
        self._mcp_pending: dict[int, asyncio.Future] = {}
        self._mcp_sub = None

    @property
    def uplink_pending(self) -> int:
        return self._uplink.qsize()

    @property
    def turn_in_flight(self) -> bool:
        return self.assembler.current_turn_id is not None

    @property
    def _speech_open(self) -> bool:
        """The user started speaking and no utterance came of it yet (speech the VAD found too
        short to keep leaves no trace: after the longest utterance, it is over anyway)."""
        return self._speech_open_at is not None and time.monotonic() - self._speech_open_at < 30.0

    @property
    def busy(self) -> bool:
        """A reply is under way, playing, or expected (for the drain on SIGTERM)."""
        return (
            self.turn_in_flight or self._speech_open or bool(self._awaiting_stt)
            or not self.downlink.idle or self.downlink.clock.buffered(time.monotonic()) > 0
        )

    async def close_for_restart(self) -> None:
        """The gateway is going away: close with 1001 (going away). The firmware does not
        reconnect by itself: it goes idle, and its next wake word opens a new connection (through
        the load balancer, to another replica). A reply still playing here (the drain's deadline
        passed first) ends with `tts stop` before the close, so the device leaves speaking as
        after any reply rather than losing its channel mid-sentence."""
        if self._closing:
            return
        cut = self.assembler.speaking or not self.downlink.idle
        with xlog.bind(session_id=self.session_id):
            log.info("closing for a gateway restart", extra={"fields": {"reply_cut": cut}})
        if cut:
            self.assembler.abort()
            self.downlink.abort()
            m.DROPPED.labels("gateway", "reply_cut_by_drain").inc()
            try:
                await self._send(protocol.tts_stop(self.session_id))
            except Exception:  # noqa: BLE001 - the device is gone already
                pass
        try:
            await self.ws.close(1001, "server restarting")
        except Exception:  # noqa: BLE001
            pass

    async def close_for_unbind(self) -> None:
        """The device was unbound (or re-bound with a new Client-Id): end the session."""
        await self._close_because(4001, "device unbound", "closing: the device was unbound")

    async def close_replaced(self) -> None:
        """A newer session of the same device was admitted: this one ends."""
        await self._close_because(4002, "replaced by a newer session", "closing: a newer session of the device connected")

    @property
    def ready(self) -> bool:
        """Past hello and not closing: server messages may reach the device now."""
        return self.hello is not None and not self._closing

    async def send_command(self, command: str, fields: dict[str, str]) -> None:
        """The owner's command from the manager (xz.gateway.command): ``notice`` shows an
        ``alert`` (status bar text, a system chat line, a face, a vibration sound; no state
        change), ``reboot`` is the firmware's ``system`` command (it closes the channel and
        restarts about a second later; this session ends when the socket drops). protocol.md
        §5.3; the firmware processes both in every state."""
        frame: dict[str, Any] = {"session_id": self.session_id}
        if command == "notice":
            frame.update(type="alert", status=fields["status"], message=fields["message"], emotion=fields["emotion"])
        else:
            frame.update(type="system", command="reboot")
        await self._send(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))
        with xlog.bind(session_id=self.session_id):
            log.info("owner's command sent to the device", extra={"fields": {"device_id": self.device_id, "command": command, "chars": len(fields.get("message", ""))}})

    async def _close_because(self, code: int, reason: str, message: str) -> None:
        if self._closing:
            return
        with xlog.bind(session_id=self.session_id):
            log.info(message)
        try:
            await self.ws.close(code, reason)
        except Exception:  # noqa: BLE001
            pass

    def _over_turn_limit(self, turn_id: str) -> bool:
        """Count a new user turn against the rate limits; over them, the turn is dropped, the
        user hears "slow down" and is not heard for a while."""
        if self._admit_turn():
            return False
        limits = self.settings.rate_limits
        self._muted_until = time.monotonic() + limits.cooldown_s
        self.assembler.discard(turn_id)
        self._enqueue_uplink(self.subjects.ctl(self.session_id), Control(session_id=self.session_id, kind="cancel", turn_id=turn_id).encode(), False)
        m.DROPPED.labels("gateway", "turn_rate_limited").inc()
        with xlog.bind(turn_id=turn_id):
            log.warning("turn rate limit reached", extra={"fields": {"cooldown_s": limits.cooldown_s}})
        return True

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes."""
        xlog.set_session(self.session_id)
        m.SESSIONS.inc()
        log.info("connected", extra={"fields": {"device_id": self.device_id, "client_id": self.client_id, "protocol_version": self.version}})
        try:
            if not await self._await_hello():
                return
            self.downlink.start()
            self._watchdog = asyncio.create_task(self._turn_watchdog())
            async for message in self.ws:
                if isinstance(message, bytes):
                    self._last_frame = time.monotonic()
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup()
            m.SESSIONS.dec()
            log.info("disconnected")

    async def _await_hello(self) -> bool:
        deadline = time.monotonic() + self.settings.hello_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.info("no hello in time, closing")
                m.DROPPED.labels("gateway", "hello_timeout").inc()
                await self.ws.close(1008, "hello timeout")
                return False
            try:
                message = await asyncio.wait_for(self.ws.recv(), remaining)
            except asyncio.TimeoutError:
                continue
            if isinstance(message, bytes):
                m.DROPPED.labels("gateway", "audio_before_hello").inc()
                continue
            try:
                parsed = protocol.parse_message(message)
            except protocol.ProtocolError as exc:
                self._bad_input(exc)
                continue
            if isinstance(parsed, protocol.Hello):
                await self._on_hello(parsed)
                return True
            m.DROPPED.labels("gateway", "message_before_hello").inc()
            log.info("message before hello ignored", extra={"fields": {"type": type(parsed).__name__}})

    async def _on_hello(self, hello: protocol.Hello) -> None:
        self.hello = hello
        # Subscribed (and known to NATS) before the device hears the hello: a device or an LLM
        # turn that acts at once must find this session's subjects (seen: NoResponders for
        # xz.device.<session>.mcp asked right after the handshake).
        # Bounded: a reply's frames arrive faster than real time (a long song: thousands).
        self._out_sub = await self.nc.subscribe(self.subjects.out(self.session_id), cb=self._on_out, pending_msgs_limit=20000, pending_bytes_limit=16 * 1024 * 1024)
        self._mcp_sub = await self.nc.subscribe(self.subjects.device_mcp(self.session_id), cb=self._on_mcp_request)
        try:
            await self.nc.flush(timeout=2)
        except Exception as exc:  # noqa: BLE001 - NATS slow: carry on, as before
            log.warning("subscriptions not confirmed before hello: %s", exc)
        await self._send(protocol.server_hello(self.session_id, self.settings.sample_rate, self.settings.frame_duration, self.version))
        self.downlink.glyphs = glyphs.for_hello(self.settings, hello)
        if hello.features.get("mcp"):
            # Valid for this session's life, refused once it ended (gateway/vision.py).
            token = auth.issue_vision_token(self.auth_key, self.device_id, int(time.time()), self.settings.auth.vision_ttl_seconds, self.session_id) if self.vision_url else None
            await self._send_mcp(mcp.initialize(self.vision_url, token))
        else:
            self._mcp_listed.set()
        self._claim_task = asyncio.create_task(self._claim_vad())
        self._pump_task = asyncio.create_task(self._pump_uplink())
        self.downlink.set_uplink_frame(hello.audio.frame_duration / 1000)
        log.info("hello", extra={"fields": {"features": hello.features, "uplink_rate": hello.audio.sample_rate, "uplink_frame_ms": hello.audio.frame_duration}})

    async def _claim_vad(self) -> None:
        claim = VadClaim(
            session_id=self.session_id,
            device_id=self.device_id,
            sample_rate=self.hello.audio.sample_rate if self.hello else 16000,
            frame_duration=self.hello.audio.frame_duration if self.hello else 60,
            mode=self.mode,  # type: ignore[arg-type]
        )
        for attempt in range(5):
            try:
                reply = await self.nc.request(self.subjects.vad_claim, claim.encode(), timeout=self.settings.claim_timeout_s)
                ack = VadClaimAck.decode(reply.data)
                log.info("vad claimed", extra={"fields": {"worker": ack.worker_id}})
                self.vad_owner = ack.worker_id
                self.vad_claimed_at = time.monotonic()
                self._audio_published = 0  # a fresh stream on that worker
                self._claimed = True
                self._claim_done.set()
                return
            except Exception as exc:  # noqa: BLE001
                log.warning("vad claim failed (attempt %d): %s", attempt + 1, exc)
                m.ERRORS.labels("gateway", "vad_claim").inc()
                await asyncio.sleep(0.5 * (attempt + 1))
        log.error("no VAD worker took the session; speech will not be heard until one does")
        self.vad_claimed_at = time.monotonic()
        self._claim_done.set()

    @property
    def claiming(self) -> bool:
        return self._claim_task is not None and not self._claim_task.done()

    def needs_vad(self, now: float, last_seen: dict[str, float], dead_after_s: float) -> bool:
        """True when the session's VAD owner fell silent (or none took it and it is time to
        ask again)."""
        if self._closing or self.hello is None or self.claiming:
            return False
        if self.vad_owner is None:
            return now - self.vad_claimed_at > max(5.0, dead_after_s)
        return now - max(last_seen.get(self.vad_owner, float("-inf")), self.vad_claimed_at) > dead_after_s

    async def reclaim_vad(self, why: str) -> None:
        """The VAD owner is gone: hand the session to another worker. Speech it was hearing is
        lost; if the user was talking, they hear a short sorry."""
        if self._closing or self.claiming:
            return
        with xlog.bind(session_id=self.session_id):
            log.warning("re-claiming the session's VAD", extra={"fields": {"why": why, "owner": self.vad_owner}})
        m.VAD_RECLAIMS.labels(why).inc()
        self._claimed = False
        self.vad_owner = None
        if self._speech_open:
            self._speech_open_at = None
            await self._say_phrase("sorry", reason="vad_lost")
        self._claim_task = asyncio.create_task(self._claim_vad())

    async def _pump_uplink(self) -> None:
        await self._claim_done.wait()
        while True:
            subject, payload, is_audio, received = await self._uplink.get()
            if is_audio and not self._claimed:
                m.DROPPED.labels("gateway", "no_vad_owner").inc()
                continue
            headers = None
            if isinstance(payload, Control):
                payload = payload.model_copy(update={"frames": self._audio_published}).encode()
            if is_audio:
                self._audio_published += 1
                # One frame in UPLINK_LAG_SAMPLE carries its arrival time, for the VAD's
                # frame-lag histogram (headers on every frame would cost both sides CPU).
                self._uplink_frames += 1
                if self._uplink_frames % UPLINK_LAG_SAMPLE == 1:
                    headers = {HDR_RECEIVED: f"{received:.6f}"}
            try:
                await self.nc.publish(subject, payload, headers=headers)
            except Exception as exc:  # noqa: BLE001
                m.ERRORS.labels("gateway", "publish").inc()
                log.warning("uplink publish failed: %s", exc)

    def _enqueue_uplink(self, subject: str, payload: bytes | Control, is_audio: bool) -> None:
        try:
            self._uplink.put_nowait((subject, payload, is_audio, time.time()))
        except asyncio.QueueFull:
            m.DROPPED.labels("gateway", "uplink_queue_full").inc()

    async def _cleanup(self) -> None:
        self._closing = True
        if self._watchdog:
            self._watchdog.cancel()
        for task in (self._claim_task, self._pump_task, self._greeting_task):
            if task and not task.done():
                task.cancel()
        await self.downlink.close()
        for future in self._mcp_pending.values():
            if not future.done():
                future.cancel()
        if self._mcp_sub is not None:
            try:
                await self._mcp_sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
        if self._out_sub is not None:
            try:
                await self._out_sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
            await self._publish_ctl(Control(session_id=self.session_id, kind="close"))
            try:
                await self.nc.publish(self.subjects.session_end, SessionEnd(session_id=self.session_id, device_id=self.device_id).encode())
            except Exception:  # noqa: BLE001
                m.ERRORS.labels("gateway", "publish").inc()

    # ------------------------------------------------------------------ device -> server

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._on_audio(message)
            return
        try:
            parsed = protocol.parse_message(message)
        except protocol.ProtocolError as exc:
            self._bad_input(exc)
            return
        m.MESSAGES_IN.labels(type(parsed).__name__.lower()).inc()
        if isinstance(parsed, protocol.Hello):
            # A second hello just gets another reply (protocol.md §3.2).
            await self._send(protocol.server_hello(self.session_id, self.settings.sample_rate, self.settings.frame_duration, self.version))
        elif isinstance(parsed, protocol.Listen):
            await self._on_listen(parsed)
        elif isinstance(parsed, protocol.Abort):
            await self._on_abort(parsed)
        elif isinstance(parsed, protocol.Ping):
            await self._send(protocol.pong())
        elif isinstance(parsed, protocol.Mcp):
            await self._on_mcp_reply(parsed.payload)
        elif parsed.type == "iot":
            # Legacy firmware (<= 1.7) describes its things and states: they become tools.
            self.iot.update(parsed.raw)
        else:
            m.DROPPED.labels("gateway", "unknown_type").inc()
            log.info("unknown message type ignored", extra={"fields": {"type": parsed.type}})

    def _bad_input(self, exc: protocol.ProtocolError) -> None:
        m.DROPPED.labels("gateway", exc.reason).inc()
        log.info("bad input dropped", extra={"fields": {"reason": exc.reason, "detail": str(exc)[:120]}})

    async def _on_audio(self, data: bytes) -> None:
        try:
            opus, _timestamp = protocol.decode_audio(data, self.version)
        except protocol.ProtocolError as exc:
            self._bad_input(exc)
            return
        m.FRAMES_IN.inc()
        arrived = time.monotonic()
        self._frame_arrivals.append(arrived)
        # While the microphone streams the device is not speaking (SpeakingGate).
        self.downlink.uplink_frame(arrived)
        if self._muted_until and time.monotonic() < self._muted_until:
            m.DROPPED.labels("gateway", "rate_limited").inc()
            return
        self._enqueue_uplink(self.subjects.audio(self.session_id), opus, True)

    async def _on_listen(self, listen: protocol.Listen) -> None:
        log.info("listen", extra={"fields": {"state": listen.state, "mode": listen.mode, "text": listen.text}})
        if listen.state == "start":
            self.mode = listen.mode or "auto"
            self.downlink.mic_stays_on = self.mode == "realtime"
            await self._publish_ctl(Control(session_id=self.session_id, kind="listen_start", mode=self.mode))  # type: ignore[arg-type]
            self._listening.set()
        elif listen.state == "stop":
            await self._publish_ctl(Control(session_id=self.session_id, kind="listen_stop"))
        elif listen.state == "detect":
            text = (listen.text or "").strip()
            # Right after the pre-roll burst, `detect` names the device's own wake word, listed
            # here or not (小土豆, "Alexa"): a greeting, never a question to the LLM. Without a
            # burst, text that is no listed wake word is typed input (protocol.md §6.7).
            preroll = self._preroll_burst()
            wake = preroll or normalise_wake_word(text) in self._wake_words
            await self._publish_ctl(Control(session_id=self.session_id, kind="detect", text=text, wake=preroll))
            if not text and not preroll:
                return
            self._last_voice = time.monotonic()
            if wake:
                log.info("wake word", extra={"fields": {"text": text, "preroll": preroll, "listed": normalise_wake_word(text) in self._wake_words}})
                # The firmware sends `detect` before it switches to listening and sends
                # `listen start`; a `tts start` that arrives while it is still connecting is
                # ignored (protocol.md §9.11). Greet once it listens (or after 0.5 s), and
                # after a pre-roll only once the VAD heard the wake word was all.
                self._listening.clear()
                if self._wake_verdict is not None and not self._wake_verdict.done():
                    self._wake_verdict.cancel()
                self._wake_verdict = asyncio.get_running_loop().create_future() if preroll else None
                if self._greeting_task is not None and not self._greeting_task.done():
                    self._greeting_task.cancel()
                self._greeting_task = asyncio.create_task(self._greet_when_listening(self._wake_verdict))
                return
            await self._text_turn(text)

    def _preroll_burst(self) -> bool:
        """Did the wake word's pre-roll just arrive? The firmware sends its buffered audio as
        fast as it can right before `detect`; a live microphone sends in real time."""
        now = time.monotonic()
        recent = [t for t in self._frame_arrivals if now - t <= PREROLL_WINDOW_S]
        if len(recent) < PREROLL_MIN_FRAMES:
            return False
        frame_s = (self.hello.audio.frame_duration if self.hello else 60) / 1000
        return now - recent[0] < 0.25 * len(recent) * frame_s

    async def _greet_when_listening(self, verdict: asyncio.Future | None = None) -> None:
        try:
            await asyncio.wait_for(self._listening.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
        if verdict is not None:
            try:
                outcome = await asyncio.wait_for(verdict, self.settings.wake_verdict_timeout_s)
            except asyncio.TimeoutError:
                outcome = "no_verdict"  # a client that sends no audio after `listen start`
            m.WAKE_WORDS.labels(outcome).inc()
            if outcome == "more":
                # A question in the same breath: its utterance (wake word and question) is
                # the turn, and a greeting would talk over it.
                log.info("question after the wake word: no greeting")
                self._greet_if_discarded_until = time.monotonic() + self.settings.stt_timeout_s
                return
        else:
            m.WAKE_WORDS.labels("no_preroll").inc()
        await self._greet()

    async def _greet(self) -> None:
        """The wake-word greeting: a fixed phrase from the TTS worker's clip cache, no LLM.

        The device's agent (set in the manager) may have its own greeting and voice."""
        agent = await self._agent()
        language = agent.language if agent is not None else None
        text = phrase("greeting", language, self.settings.wake_word_greeting) if self.settings.wake_word_greeting else ""
        voice = self.settings.greeting_voice
        if agent is not None:
            text = agent.wake_greeting or text
            voice = agent.voice or voice
        if not text:
            return
        await self._say(text, voice=voice, emotion="happy", language=language, engine=agent.tts_engine if agent is not None else None)

    async def _say_phrase(self, key: str, reason: str) -> None:
        """A fixed phrase ("busy", "sorry", "slow_down") in the agent's language, by the engine
        that speaks it."""
        agent = await self._agent()
        language = agent.language if agent is not None else None
        english = {"busy": self.settings.busy_text, "sorry": self.settings.error_text, "slow_down": self.settings.rate_limits.slow_down_text}.get(key)
        await self._say(phrase(key, language, english), reason=reason, language=language, engine=agent.tts_engine if agent is not None else None)

    async def _agent(self) -> AgentConfig | None:
        """This device's agent from the manager's KV bucket; None when there is none (or NATS
        does not answer within 0.5 s: the greeting must not wait)."""
        if self.agents is None:
            self.agents = AgentDirectory(self.nc, self.subjects.kv_agents)
        return await self.agents.get(self.device_id)

    async def _say(self, text: str, voice: str | None = None, emotion: str = "neutral", reason: str | None = None, language: str | None = None, engine: str | None = None) -> None:
        """Speak a fixed phrase as a turn of its own (greeting, "busy", "sorry"), from the TTS
        workers' clip cache over plain NATS, so it is heard even when the work queues are full."""
        if reason is not None:
            m.FALLBACK_REPLIES.labels(reason).inc()
        turn_id = new_turn_id()
        with xlog.bind(turn_id=turn_id):
            log.info("saying a fixed phrase", extra={"fields": {"text": text, "reason": reason}})
        self._push(self.assembler.begin_local_turn(turn_id, sentences=1, emotion=emotion))
        job = SentenceJob(
            session_id=self.session_id,
            turn_id=turn_id,
            seq=0,
            text=text,
            voice=voice,
            engine=engine,
            language=language,
            sample_rate=self.settings.sample_rate,
            frame_duration=self.settings.frame_duration,
            cache=True,
        )
        try:
            await self.nc.publish(self.subjects.say(self.session_id), job.encode())
        except Exception as exc:  # noqa: BLE001 - NATS down: end the local turn, never hang
            m.ERRORS.labels("gateway", "publish").inc()
            log.warning("fixed phrase publish failed: %s", exc)
            self._push(self.assembler.timeout())

    async def _queue_turn(self, turn: UserTurn) -> bool:
        """Put a user turn on the LLM queue; on refusal the user hears why. True when queued."""
        try:
            await publish_work(self.nc, self.subjects.llm(self.session_id), turn.encode(), self.work.publish_timeout_s)
            return True
        except (StageBusy, StageUnavailable) as exc:
            busy = isinstance(exc, StageBusy)
            m.ERRORS.labels("gateway", "llm_busy" if busy else "llm_unavailable").inc()
            log.warning("LLM queue refused the turn: %s", exc)
            if turn.source == "idle":
                self._push(self.assembler.timeout())
                return False
            await self._say_phrase("busy" if busy else "sorry", reason="busy" if busy else "unavailable")
            return False

    async def _text_turn(self, text: str) -> None:
        """Typed text (`listen detect` that is no wake word) is a user turn (protocol.md §6.7)."""
        turn_id = new_turn_id()
        if self._over_turn_limit(turn_id):
            await self._say_phrase("slow_down", reason="rate_limited")
            return
        self.assembler.begin_text_turn(turn_id)
        self._turn_started_at[turn_id] = time.monotonic()
        while len(self._turn_started_at) > 8:  # turns that never spoke leave no trace for long
            self._turn_started_at.pop(next(iter(self._turn_started_at)))
        turn = UserTurn(session_id=self.session_id, turn_id=turn_id, device_id=self.device_id, text=text, source="text")
        with xlog.bind(turn_id=turn_id):
            log.info("text turn", extra={"fields": {"text": text}})
        await self._queue_turn(turn)

    async def _on_abort(self, abort: protocol.Abort) -> None:
        # Always answer with `tts stop`: a button-abort device stays in speaking until it comes.
        await self._stop_reply("abort", abort.reason)

    async def _stop_reply(self, why: str, reason: str | None = None, keep_speech: bool = False) -> None:
        """Stop the reply now: fence its turn, empty the queue, `tts stop`, tell the stages.
        ``keep_speech``: the VAD keeps the utterance that interrupted (a voice barge-in)."""
        turn_id, _was_started = self.assembler.abort()
        self.downlink.abort()
        await self._send(protocol.tts_stop(self.session_id))
        m.ABORTS.inc()
        with xlog.bind(turn_id=turn_id):
            log.info(why, extra={"fields": {"reason": reason}})
        await self._publish_ctl(Control(session_id=self.session_id, kind="abort", turn_id=turn_id, keep_speech=keep_speech))

    def _push(self, actions: list) -> None:
        """Hand actions to the paced sender; a superseded turn is cancelled at the stages too,
        so a worker does not go on answering what nobody will hear."""
        for action in actions:
            if isinstance(action, Flush):
                self._enqueue_uplink(self.subjects.ctl(self.session_id), Control(session_id=self.session_id, kind="cancel", turn_id=action.turn_id).encode(), False)
        self.downlink.push(actions)

    async def _publish_ctl(self, ctl: Control) -> None:
        if ctl.kind != "close":
            self._enqueue_uplink(self.subjects.ctl(self.session_id), ctl, False)
            return
        try:
            await self.nc.publish(self.subjects.ctl(self.session_id), ctl.encode())
        except Exception as exc:  # noqa: BLE001
            m.ERRORS.labels("gateway", "publish").inc()
            log.warning("control publish failed: %s", exc)

    # ------------------------------------------------------------------ NATS -> device

    async def _on_out(self, msg: Msg) -> None:
        if self._closing:
            return
        meta = AudioFrameMeta.from_headers(msg.headers)
        before = self.assembler.dropped
        if meta is not None:
            actions = self.assembler.on_audio(meta.turn_id, meta.seq, meta.index, msg.data)
        else:
            try:
                event = OutEvent.decode(msg.data)
            except Exception:  # noqa: BLE001
                m.DROPPED.labels("gateway", "bad_out_event").inc()
                return
            if event.kind == "speech_start":
                await self._on_speech_start()
                return
            if event.kind in ("utterance", "discard", "busy", "failed"):
                await self._on_utterance_event(event)
                return
            if event.kind in ("wake_end", "wake_more"):
                if self._wake_verdict is not None and not self._wake_verdict.done():
                    self._wake_verdict.set_result(event.kind.removeprefix("wake_"))
                return
            if event.kind == "progress":
                # A slow server tool is working on the current turn: it is not lost.
                if event.turn_id == self.assembler.current_turn_id:
                    self._last_turn_activity = time.monotonic()
                return
            with xlog.bind(turn_id=event.turn_id):
                log.debug("event", extra={"fields": {"kind": event.kind, "seq": event.seq}})
                if event.kind in ("stt", "error"):
                    log.info(event.kind, extra={"fields": {"text": event.text}})
                if event.kind == "stt":
                    self._awaiting_stt.pop(event.turn_id, None)
                    self._greet_if_discarded_until = 0.0
                if event.kind == "stt" and event.speech_end_ms:
                    self._speech_end_ms[event.turn_id] = event.speech_end_ms
                    while len(self._speech_end_ms) > 8:
                        self._speech_end_ms.pop(next(iter(self._speech_end_ms)))
            actions = self.assembler.on_event(event)
        if self.assembler.dropped > before:
            m.DROPPED.labels("gateway", "stale_turn").inc(self.assembler.dropped - before)
        if actions:
            self._last_turn_activity = time.monotonic()
            self._push(actions)

    async def _on_utterance_event(self, event: OutEvent) -> None:
        """What became of an utterance: queued for ASR (wait for its transcript), nothing worth
        answering, or refused by a saturated stage (say so)."""
        if event.kind in ("utterance", "busy"):
            self._speech_open_at = None
        with xlog.bind(turn_id=event.turn_id):
            if event.kind == "utterance":
                if self.assembler.is_stale(event.turn_id):
                    return
                if self._over_turn_limit(event.turn_id):
                    await self._say_phrase("slow_down", reason="rate_limited")
                    return
                self._awaiting_stt[event.turn_id] = time.monotonic() + self.settings.stt_timeout_s
                while len(self._awaiting_stt) > 8:
                    self._awaiting_stt.pop(next(iter(self._awaiting_stt)))
            elif event.kind == "discard":
                self._awaiting_stt.pop(event.turn_id, None)
                log.info("utterance had nothing to answer")
                if time.monotonic() < self._greet_if_discarded_until:
                    # The wake word's utterance held no question after all: greet.
                    self._greet_if_discarded_until = 0.0
                    m.WAKE_WORDS.labels("nothing_after").inc()
                    await self._greet()
            elif event.kind == "failed":
                self._awaiting_stt.pop(event.turn_id, None)
                self._greet_if_discarded_until = 0.0
                if self.assembler.is_stale(event.turn_id):
                    return
                log.warning("speech recognition failed for the turn")
                await self._say_phrase("sorry", reason="asr_failed")
            else:
                self._awaiting_stt.pop(event.turn_id, None)
                if self.assembler.is_stale(event.turn_id):
                    return
                log.warning("a stage was saturated and refused the turn")
                await self._say_phrase("busy", reason="busy")

    async def _on_speech_start(self) -> None:
        """The VAD heard speech. In realtime mode, speech over a reply interrupts it (barge-in)."""
        self._last_voice = time.monotonic()
        self._speech_open_at = time.monotonic()
        # A device that expects the server to cancel its echo (features.aec) would hear its own
        # reply as speech: without server-side AEC here, no voice barge-in for it.
        aec = bool(self.hello and self.hello.features.get("aec"))
        if self.mode == "realtime" and self.assembler.speaking and not aec:
            await self._stop_reply("voice barge-in", "speech over the reply", keep_speech=True)

    def _first_audio(self) -> None:
        turn_id = self.assembler.current_turn_id
        speech_end = self._speech_end_ms.pop(turn_id, None) if turn_id else None
        if speech_end is not None:
            m.VOICE_TO_VOICE.observe(max(0.0, time.time() - speech_end / 1000))
        started = self._turn_started_at.pop(turn_id, None) if turn_id else None
        if started is not None:
            m.TEXT_TURN_FIRST_AUDIO.observe(time.monotonic() - started)

    async def _reply_done(self, stop: Stop) -> None:
        self._last_voice = time.monotonic()
        with xlog.bind(turn_id=stop.turn_id):
            log.info("reply played", extra={"fields": {"frames_sent": self.downlink.frames_sent}})
        m.TURNS.inc()
        if stop.close_after:
            await self.ws.close()

    async def _turn_watchdog(self) -> None:
        """End a turn that produces nothing for too long, so the device is never left hanging;
        say goodbye to, then close, a session that went quiet."""
        while True:
            await asyncio.sleep(1.0)
            await self._check_lost_utterances()
            if self.assembler.current_turn_id is None:
                await self._check_idle()
                continue
            if self.downlink.pending or self._mcp_pending:
                # Frames to send, or a device tool call under way (a camera photo: upload plus
                # the vision model), bounded by its own `mcp_call_timeout_s`: the turn is alive.
                self._last_turn_activity = time.monotonic()
                continue
            if time.monotonic() - self._last_turn_activity > self.settings.turn_timeout_s:
                log.warning("turn timed out")
                m.ERRORS.labels("gateway", "turn_timeout").inc()
                self._push(self.assembler.timeout())
                await self._say_phrase("sorry", reason="turn_timeout")

    async def _check_lost_utterances(self) -> None:
        """An utterance whose transcript never came (its ASR worker died, twice): say sorry."""
        now = time.monotonic()
        lost = [turn_id for turn_id, deadline in self._awaiting_stt.items() if deadline <= now]
        for turn_id in lost:
            self._awaiting_stt.pop(turn_id, None)
            with xlog.bind(turn_id=turn_id):
                log.warning("no transcript in time")
            m.ERRORS.labels("gateway", "stt_timeout").inc()
        if lost and not self._closing:
            await self._say_phrase("sorry", reason="stt_timeout")

    # ------------------------------------------------------------------ device MCP

    def _use_firmware_version(self, version: str | None) -> None:
        """The `tts stop` tail for this firmware: none needed from 2.4.0 (it drains its queue
        before reopening the mic), the safe one for older or unknown firmware."""
        if not version or version == self.firmware_version:
            return
        self.firmware_version = version[:64]
        drains = firmware.drains_playback(version)
        self.downlink.stop_margin_s = (self.settings.stop_tail_ms_draining if drains else self.settings.stop_tail_ms) / 1000
        log.debug("stop tail", extra={"fields": {"firmware_version": self.firmware_version, "drains": drains, "tail_ms": int(self.downlink.stop_margin_s * 1000)}})

    async def _send_mcp(self, payload: dict[str, Any]) -> None:
        await self._send(json.dumps({"session_id": self.session_id, "type": "mcp", "payload": payload}, ensure_ascii=False, separators=(",", ":")))

    async def _on_mcp_reply(self, payload: dict[str, Any]) -> None:
        """A JSON-RPC message from the device's MCP server."""
        msg_id = payload.get("id")
        if not isinstance(msg_id, int) or isinstance(msg_id, bool):
            m.DROPPED.labels("gateway", "mcp_without_id").inc()
            return
        if msg_id == mcp.INIT_ID:
            log.info("device mcp initialized", extra={"fields": {"server": self.mcp.server_info or payload.get("result", {}).get("serverInfo")}})
            await self._send_mcp(self.mcp.on_initialize_result(payload))
            version = self.mcp.server_info.get("version")
            if isinstance(version, str):
                self._use_firmware_version(version)  # the running image's own word
        elif msg_id == mcp.LIST_ID:
            follow_up = self.mcp.on_tools_list_result(payload)
            if follow_up is not None:
                await self._send_mcp(follow_up)
            else:
                self._mcp_listed.set()
                log.info("device tools", extra={"fields": {"tools": [t.name for t in self.mcp.tools], "pages": self.mcp.pages}})
        else:
            future = self._mcp_pending.pop(msg_id, None)
            if future is not None and not future.done():
                future.set_result(payload)
            else:
                m.DROPPED.labels("gateway", "mcp_unexpected_id").inc()

    async def _on_mcp_request(self, msg: Msg) -> None:
        """Another stage asks (over NATS) to list or call the device's tools."""
        try:
            request = DeviceMcpRequest.decode(msg.data)
        except Exception:  # noqa: BLE001
            await msg.respond(DeviceMcpReply(ok=False, text="malformed request").encode())
            return
        if request.method == "tools/list":
            try:
                await asyncio.wait_for(self._mcp_listed.wait(), 2.0)
            except asyncio.TimeoutError:
                pass
            tools = [DeviceTool(name=t.name, llm_name=t.llm_name, description=t.description, input_schema=t.input_schema) for t in self.mcp.tools]
            tools += [DeviceTool(name=t.name, llm_name=t.llm_name, description=t.description, input_schema=t.input_schema) for t in self.iot.tools()]
            await msg.respond(DeviceMcpReply(tools=tools).encode())
            return
        iot_tool = self.iot.find(request.name)
        if iot_tool is not None:
            if iot_tool.prop is not None:
                ok, text = self.iot.read(iot_tool)
            else:
                await self._send(json.dumps({"session_id": self.session_id, **iot.command(iot_tool, request.arguments)}, ensure_ascii=False))
                ok, text = True, f"{iot_tool.thing}.{iot_tool.method} sent to the device"
            await msg.respond(DeviceMcpReply(ok=ok, text=text).encode())
            return
        tool = self.mcp.find(request.name)
        if tool is None:
            await msg.respond(DeviceMcpReply(ok=False, text=f"the device has no tool '{request.name}'").encode())
            return
        call_id = self.mcp.next_call_id()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._mcp_pending[call_id] = future
        with xlog.bind(turn_id=request.turn_id or None):
            log.info("device tool call", extra={"fields": {"tool": tool.name, "id": call_id, "arguments": request.arguments}})
        await self._send_mcp(mcp.call_request(call_id, tool.name, request.arguments))
        try:
            payload = await asyncio.wait_for(future, self.settings.mcp_call_timeout_s)
            ok, text = mcp.result_text(payload)
        except asyncio.TimeoutError:
            ok, text = False, f"the device did not answer within {self.settings.mcp_call_timeout_s:.0f} s"
            m.ERRORS.labels("gateway", "mcp_timeout").inc()
        except asyncio.CancelledError:
            ok, text = False, "the device disconnected"
        finally:
            self._mcp_pending.pop(call_id, None)
        await msg.respond(DeviceMcpReply(ok=ok, text=text).encode())

    async def _check_idle(self) -> None:
        now = time.monotonic()
        if self.downlink.pending or self.downlink.clock.buffered(now) > 0:
            self._last_voice = now  # sending a reply is activity, as in the reference server
        quiet = now - self._last_voice
        if quiet >= self.settings.hard_close_s:
            log.info("closing idle session", extra={"fields": {"quiet_s": round(quiet)}})
            m.IDLE_CLOSES.labels("hard").inc()
            await self.ws.close(1000, "idle")
            return
        streaming = now - self._last_frame < 5.0
        if quiet >= self.settings.idle_farewell_s and streaming and not self._farewell_sent:
            self._farewell_sent = True
            if not self.settings.idle_farewell:
                m.IDLE_CLOSES.labels("silent").inc()
                await self.ws.close(1000, "idle")
                return
            m.IDLE_CLOSES.labels("farewell").inc()
            self._last_voice = now
            turn_id = new_turn_id()
            with xlog.bind(turn_id=turn_id):
                log.info("idle farewell", extra={"fields": {"quiet_s": round(quiet)}})
            self._push(self.assembler.begin_local_turn(turn_id))
            turn = UserTurn(session_id=self.session_id, turn_id=turn_id, device_id=self.device_id, text="", source="idle")
            if not await self._queue_turn(turn):
                await self.ws.close(1000, "idle")

    async def _send(self, data: str | bytes) -> None:
        await self.ws.send(data)
        if isinstance(data, bytes):
            m.FRAMES_OUT.inc()
