"""The paced sender: one task per connection that writes text and Opus to the device in order.

Text frames go out at their position in the queue without costing time; audio frames follow the
:class:`~gateway.pacing.PlayoutClock`; `tts stop` waits until the device has played what it was
sent. ``abort()`` empties the queue and wakes a sleeping sender at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable

from gateway import protocol
from gateway import metrics as m
from gateway.pacing import PlayoutClock, SpeakingGate
from gateway.turns import Action, Audio, Flush, Stop, Text

log = logging.getLogger("gateway.downlink")

Send = Callable[[str | bytes], Awaitable[None]]
# Text -> the glyph_push object for it (gateway/glyphs.py), or None.
Glyphs = Callable[[str], Awaitable["dict | None"]]


class PacedSender:
    """Orders and paces everything the gateway sends to one device during replies."""

    def __init__(
        self,
        send: Send,
        session_id: str,
        version: int,
        frame_s: float,
        lead_frames: int,
        stop_margin_s: float,
        on_first_audio: Callable[[], None] | None = None,
        on_stop: Callable[[Stop], Awaitable[None]] | None = None,
        start_gap_s: float = 0.1,
        start_wait_max_s: float = 0.0,
        uplink_frame_s: float = 0.060,
        start_quiet_frames: float = 2.0,
    ) -> None:
        self._send = send
        self.session_id = session_id
        self.version = version
        self.clock = PlayoutClock(frame_s, lead_frames)
        self.stop_margin_s = stop_margin_s
        self._queue: deque[Action] = deque()
        self._wake = asyncio.Event()
        self._interrupt = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._on_first_audio = on_first_audio
        self._on_stop = on_stop
        self._awaiting_first_audio = False
        self.start_gap_s = start_gap_s
        # The first frame waits for the device to enter speaking (its uplink goes quiet), see
        # gateway.pacing.SpeakingGate; ``start_wait_max_s`` 0: the fixed gap only.
        self.start_quiet_frames = start_quiet_frames
        self.gate = SpeakingGate(start_gap_s, start_wait_max_s, start_quiet_frames * uplink_frame_s)
        # Realtime mode: the microphone stays on while speaking, the uplink tells nothing.
        self.mic_stays_on = False
        # How the last reply's first frame was released, and its wait after `tts start` (s).
        self.last_release: tuple[str, float] | None = None
        self._superseded = False
        self._performing = False
        self.frames_sent = 0
        self.late_frames = 0
        # Set after a hello with features.glyph_push: bitmaps the device's font lacks ride along.
        self.glyphs: Glyphs | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"downlink-{self.session_id}")

    async def close(self) -> None:
        self._queue.clear()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    def push(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Flush):
                self._drop_queue()
                # The device is still playing the old reply: stop it, so that the next
                # `tts start` really starts afresh (speaking -> speaking flushes nothing).
                self._superseded = True
                continue
            self._queue.append(action)
        if actions:
            self._wake.set()

    def uplink_frame(self, at: float) -> None:
        """An uplink audio frame arrived (monotonic ``at``): while the device streams its
        microphone it has not entered speaking."""
        self.gate.uplink(at)

    def set_uplink_frame(self, frame_s: float) -> None:
        """The device's uplink frame duration (its hello): quiet is that many frames without one."""
        self.gate.quiet_s = self.start_quiet_frames * frame_s

    def abort(self) -> None:
        """Drop everything queued and stop waiting; the caller sends `tts stop` itself."""
        self._drop_queue()

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being sent (a `tts stop` waiting out the play-out tail
        counts as being sent)."""
        return not self._queue and not self._performing

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._interrupt.set()
        self._wake.set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless interrupted; True if the full time passed."""
        if seconds <= 0:
            return not self._interrupt.is_set()
        try:
            await asyncio.wait_for(self._interrupt.wait(), seconds)
            return False
        except asyncio.TimeoutError:
            return True

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._interrupt.clear()
            action = self._queue.popleft()
            self._performing = True
            try:
                await self._perform(action)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead socket ends the session elsewhere
                log.debug("downlink send failed: %s", exc)
                self._queue.clear()
            finally:
                self._performing = False

    async def _glyph_push(self, text: str) -> "dict | None":
        if self.glyphs is None:
            return None
        try:
            return await self.glyphs(text)
        except Exception as exc:  # noqa: BLE001 - glyphs are a nicety: the text goes out without
            log.warning("glyph_push failed: %s", exc)
            return None

    async def _perform(self, action: Action) -> None:
        if isinstance(action, Text):
            if action.kind == "stt":
                await self._send(protocol.stt(self.session_id, action.text, await self._glyph_push(action.text)))
            elif action.kind == "tts_start":
                if self._superseded and self.clock.buffered(time.monotonic()) > 0:
                    await self._send(protocol.tts_stop(self.session_id))
                self._superseded = False
                self.clock.reset()
                self._awaiting_first_audio = True
                await self._send(protocol.tts_start(self.session_id))
                self.gate.start(time.monotonic(), self.mic_stays_on)
            elif action.kind == "emotion":
                await self._send(protocol.llm_emotion(self.session_id, action.emotion))
            elif action.kind == "sentence_start":
                await self._send(protocol.sentence_start(self.session_id, action.text, await self._glyph_push(action.text)))
        elif isinstance(action, Audio):
            if self._awaiting_first_audio:
                # Wait until the device has entered speaking; a later uplink frame moves the
                # release later, so sleep, look again, and go once it is not in the future.
                ready = max(time.monotonic(), self.gate.started_at + self.start_gap_s)  # the fixed gap's time
                while True:
                    release_at, why = self.gate.release()
                    wait = release_at - time.monotonic()
                    if wait <= 0:
                        break
                    if not await self._sleep(wait):
                        return  # aborted while waiting: the frame is dropped with the queue
                released = time.monotonic()
                m.FIRST_FRAME_RELEASES.labels(why).inc()
                m.FIRST_FRAME_HOLD.observe(max(0.0, released - ready))
                self.last_release = (why, released - self.gate.started_at)
                log.debug("first frame released", extra={"fields": {"how": why, "after_tts_start_ms": round((released - self.gate.started_at) * 1000), "held_ms": round(max(0.0, released - ready) * 1000)}})
            delay = self.clock.delay(time.monotonic())
            if not await self._sleep(delay):
                return  # aborted while waiting: the frame is dropped with the queue
            now = time.monotonic()
            self.clock.sent(now)
            await self._send(protocol.encode_audio(action.opus, self.version, int(now * 1000) & 0xFFFFFFFF))
            self.frames_sent += 1
            if self._awaiting_first_audio:
                self._awaiting_first_audio = False
                if self._on_first_audio:
                    self._on_first_audio()
        elif isinstance(action, Stop):
            wait = self.clock.buffered(time.monotonic()) + self.stop_margin_s
            if not await self._sleep(wait):
                return
            await self._send(protocol.tts_stop(self.session_id))
            if self._on_stop:
                await self._on_stop(action)
