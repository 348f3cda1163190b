"""The firmware's device-side rules, as a pure model the simulated device runs (no network).

Each rule is taken from the firmware source (78/xiaozhi-esp32) so that tests catch what a real
device would do: audio is played only in *speaking*, the decode queue holds 40 packets and drops
the excess, ``tts stop`` lets queued audio play on (>= 2.4.0), auto mode sends ``listen start``
only after playback drained, realtime never re-sends it, a wake word while speaking aborts, the
channel expires after 120 s without data, and ``tools/list`` pages as ``McpServer::GetToolsList``.
Times are monotonic seconds passed in by the caller, so scripted frame sequences can be replayed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

FRAME_S = 0.060  # OPUS_FRAME_DURATION_MS
DECODE_QUEUE_PACKETS = 2400 // 60  # MAX_DECODE_PACKETS_IN_QUEUE: 40, a full queue drops the packet
PLAYBACK_TASKS = 2  # MAX_PLAYBACK_TASKS_IN_QUEUE: decoded frames waiting for the output task
CHANNEL_TIMEOUT_S = 120  # Protocol::IsTimeout: no incoming data frame for more than 120 s
MCP_PAGE_BYTES = 8000  # GetToolsList max_payload_size
SPEAKING_DELAY_S = 0.02  # `tts start` switches state on the main loop (Schedule): a moment later

IDLE, CONNECTING, LISTENING, SPEAKING = "idle", "connecting", "listening", "speaking"


def version_at_least(version: str, minimum: str) -> bool:
    """``"2.4.2" >= "2.4.0"`` on the numeric parts (a non-numeric version counts as new)."""
    def parts(v: str) -> list[int]:
        out = []
        for piece in v.split("."):
            digits = "".join(ch for ch in piece if ch.isdigit())
            out.append(int(digits) if digits else 0)
        return out

    try:
        have, want = parts(version), parts(minimum)
    except ValueError:
        return True
    length = max(len(have), len(want))
    return have + [0] * (length - len(have)) >= want + [0] * (length - len(want))


@dataclass
class Drops:
    """Downlink audio the device would not play, by cause."""

    not_speaking: dict[str, int] = field(default_factory=dict)  # state -> frames that arrived then
    queue_full: int = 0  # arrived to a full 40-packet decode queue
    flushed: int = 0  # queued but thrown away (ResetDecoder: < 2.4.0 `tts stop`, wake word)

    def by_cause(self) -> dict[str, int]:
        """``{"not speaking (listening)": n, "queue full": n, "flushed": n}``, zeros left out."""
        out = {f"not speaking ({state})": n for state, n in self.not_speaking.items() if n}
        out.update({k: v for k, v in (("queue full", self.queue_full), ("flushed", self.flushed)) if v})
        return out

    @property
    def total(self) -> int:
        return sum(self.not_speaking.values()) + self.queue_full + self.flushed


class DeviceStateMachine:
    """The firmware's device state and audio output, fed with timestamped events.

    ``on_*`` methods take what arrived; ``listen_start_due``/``poll`` say when the device itself
    sends ``listen start`` (auto mode, once playback drained). Nothing here does I/O.
    """

    def __init__(self, firmware_version: str = "2.4.2", speaking_delay_s: float = SPEAKING_DELAY_S,
                 queue_packets: int = DECODE_QUEUE_PACKETS, channel_timeout_s: float = CHANNEL_TIMEOUT_S,
                 frame_s: float = FRAME_S) -> None:
        self.firmware_version = firmware_version
        self.keeps_tail = version_at_least(firmware_version, "2.4.0")
        self.speaking_delay_s = speaking_delay_s
        self.queue_packets = queue_packets
        self.channel_timeout_s = channel_timeout_s
        self.frame_s = frame_s
        self.state = IDLE
        self.channel_open = False
        self.mode = "auto"  # listening_mode_
        self.processor_running = False  # voice processing on: `listen start` was sent
        self.pending_listen = False  # auto mode: `listen start` waits for playback to drain
        self.play_popup = False  # play_popup_on_listening_: forces StartListeningAudio
        self.speaking_from: float | None = None  # when the switch to speaking takes effect
        self.last_incoming: float | None = None
        self.drops = Drops()
        self.ignored: list[tuple[str, str]] = []  # (message, state) a device ignored
        self.accepted = 0
        self._ends: list[float] = []  # play-out end of each frame in the output path
        self.sent: list[dict[str, Any]] = []  # what the device itself sent (listen start, abort)

    # ------------------------------------------------------------------ playback

    def _advance(self, at: float) -> None:
        self._ends = [t for t in self._ends if t > at]

    def playback_end(self) -> float:
        return self._ends[-1] if self._ends else 0.0

    def playback_idle(self, at: float) -> bool:
        self._advance(at)
        return not self._ends

    def _reset_decoder(self, at: float) -> None:
        """ResetDecoder: decode and playback queues cleared; the frame being output finishes."""
        self._advance(at)
        if len(self._ends) > 1:
            self.drops.flushed += len(self._ends) - 1
            self._ends = self._ends[:1]

    # ------------------------------------------------------------------ states

    def _set_state(self, state: str, at: float) -> None:
        """SetDeviceState + HandleStateChangedEvent (the parts that touch audio)."""
        self.state = state
        self.pending_listen = False
        if state == IDLE:
            self.processor_running = False
        elif state == LISTENING:
            if self.play_popup or not self.processor_running:
                if self.mode == "auto" and not self.playback_idle(at):
                    self.pending_listen = True  # MAIN_EVENT_PLAYBACK_DRAINED sends it
                else:
                    self._start_listening(at)
        elif state == SPEAKING:
            if self.mode != "realtime":
                self.processor_running = False
            self._reset_decoder(at)

    def _start_listening(self, at: float) -> None:
        """StartListeningAudio: sends `listen start`; enabling voice processing resets the decoder."""
        if self.state != LISTENING:
            return
        self.sent.append({"at": at, "type": "listen", "state": "start", "mode": self.mode})
        self.processor_running = True
        self.play_popup = False
        self._reset_decoder(at)

    def connecting(self, at: float) -> None:
        self.state = CONNECTING
        self.channel_open = False

    def channel_opened(self, at: float) -> None:
        """The server hello arrived: the channel is open; the device is idle until it listens."""
        self.channel_open = True
        self.last_incoming = at
        if self.state == CONNECTING:
            self.state = IDLE

    def channel_closed(self, at: float) -> None:
        self.channel_open = False
        self._set_state(IDLE, at)

    def channel_expired(self, at: float) -> bool:
        """IsTimeout: whole seconds since the last incoming data frame exceed the limit."""
        if not self.channel_open or self.last_incoming is None:
            return False
        return math.floor(at - self.last_incoming) > self.channel_timeout_s

    def listen_start(self, mode: str, at: float) -> None:
        """The device (or the test driving it) sent `listen start`."""
        self.mode = mode
        self.pending_listen = False
        self.state = LISTENING
        self.processor_running = True

    def listen_stop(self, at: float) -> None:
        if self.state == LISTENING:
            self._set_state(IDLE, at)

    def wake_word(self, at: float, default_mode: str | None = None) -> list[dict[str, Any]]:
        """HandleWakeWordDetectedEvent while speaking or listening: what the device sends now.

        Speaking: `abort` (wake_word_detected), then listening with `listen start` (deferred
        until playback drained in auto mode). Listening: `abort`, `listen start` at once and the
        decoder reset. Idle gives [] (the caller runs the wake-word invocation: detect + start).
        """
        mode = default_mode or self.mode
        if self.state not in (SPEAKING, LISTENING):
            return []
        out: list[dict[str, Any]] = [{"type": "abort", "reason": "wake_word_detected"}]
        if self.state == LISTENING:
            out.append({"type": "listen", "state": "start", "mode": mode})
            self.mode = mode
            self._reset_decoder(at)
            return out
        mark = len(self.sent)
        self.play_popup = True
        self.mode = mode
        self._set_state(LISTENING, at)
        out.extend({k: v for k, v in m.items() if k != "at"} for m in self.sent[mark:])
        return out

    def poll(self, at: float) -> list[dict[str, Any]]:
        """Fire a deferred `listen start` if playback has drained by ``at``."""
        if self.pending_listen and self.state == LISTENING and self.playback_idle(at):
            self.pending_listen = False
            mark = len(self.sent)
            self._start_listening(at)
            return [{k: v for k, v in m.items() if k != "at"} for m in self.sent[mark:]]
        return []

    def listen_start_due(self) -> float | None:
        """When a deferred `listen start` will go out (playback end), or None."""
        return self.playback_end() if self.pending_listen else None

    def microphone_on(self, at: float) -> bool:
        """Does the device stream its microphone at ``at``? Entering *speaking* turns voice
        processing off in auto and manual mode (``HandleStateChangedEvent``:
        ``EnableVoiceProcessing(false)`` unless realtime), when the switch takes effect (20 ms
        after `tts start` arrived); after `tts stop` in auto mode it stays off until the deferred
        `listen start` (playback drained). Idle and listening otherwise are left to the caller.
        """
        if self.state == SPEAKING:
            return self.mode == "realtime" or self.speaking_from is None or at < self.speaking_from
        if self.state == LISTENING and self.pending_listen:
            return False
        return True

    # ------------------------------------------------------------------ what arrives

    def on_data(self, at: float) -> None:
        self.last_incoming = at

    def on_json(self, message: dict[str, Any], at: float) -> None:
        self.on_data(at)
        if message.get("type") != "tts":
            return
        state = message.get("state")
        if state == "start":
            if self.state == CONNECTING or not self.channel_open:
                self.ignored.append(("tts start", self.state))  # not a valid transition
                return
            self.speaking_from = at + self.speaking_delay_s
            self._set_state(SPEAKING, at)
        elif state == "stop":
            if self.state != SPEAKING:
                self.ignored.append(("tts stop", self.state))
                return
            if not self.keeps_tail:
                self._reset_decoder(at)  # older firmware: the queue goes with the state
            self._set_state(IDLE if self.mode == "manual" else LISTENING, at)

    def on_audio(self, at: float) -> bool:
        """One downlink packet: queued (True) or dropped and counted (False)."""
        self.on_data(at)
        if self.state != SPEAKING or (self.speaking_from is not None and at < self.speaking_from):
            state = self.state if self.state != SPEAKING else "entering speaking"
            self.drops.not_speaking[state] = self.drops.not_speaking.get(state, 0) + 1
            return False
        self._advance(at)
        waiting = max(0, len(self._ends) - PLAYBACK_TASKS - 1)  # one plays, two are decoded
        if waiting >= self.queue_packets:
            self.drops.queue_full += 1
            return False
        start = max(at, self.playback_end())
        self._ends.append(start + self.frame_s)
        self.accepted += 1
        return True


# ---------------------------------------------------------------------- MCP tools/list


def tool_json(tool: dict[str, Any]) -> str:
    """A tool as cJSON_PrintUnformatted writes it (no spaces, UTF-8 kept)."""
    return json.dumps({k: v for k, v in tool.items() if k != "userOnly"}, separators=(",", ":"), ensure_ascii=False)


def tools_list_page(tools: list[dict[str, Any]], cursor: str = "", with_user_tools: bool = False,
                    max_payload: int = MCP_PAGE_BYTES) -> tuple[dict[str, Any] | None, str | None]:
    """McpServer::GetToolsList: (result, None) or (None, error message).

    The page starts at the tool named ``cursor``; a tool is added while
    ``len(json) + len(tool_json + ",") + 30 <= max_payload`` (bytes, with ``json`` the page so
    far from ``{"tools":[``); the first tool that does not fit becomes ``nextCursor``. A page with
    no tool (an unknown cursor, or a first tool too big) is the error
    ``Failed to add tool <next_cursor> because of payload size limit``.
    """
    size = len('{"tools":[')
    found = not cursor
    page: list[dict[str, Any]] = []
    next_cursor = ""
    for tool in tools:
        if not found:
            if tool.get("name") != cursor:
                continue
            found = True
        if tool.get("userOnly") and not with_user_tools:
            continue
        piece = len(tool_json(tool).encode()) + 1
        if size + piece + 30 > max_payload:
            next_cursor = str(tool.get("name"))
            break
        page.append({k: v for k, v in tool.items() if k != "userOnly"})
        size += piece
    if not page and tools:
        return None, f"Failed to add tool {next_cursor} because of payload size limit"
    result: dict[str, Any] = {"tools": page}
    if next_cursor:
        result["nextCursor"] = next_cursor
    return result, None


# ---------------------------------------------------------------------- network jitter


@dataclass
class Jitter:
    """Downlink delays as on a real link: a base delay, random jitter and occasional stalls.

    TCP keeps order, so a late message holds back everything behind it.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # mean of an exponential extra delay per message
    stall_every_s: float = 0.0  # mean time between stalls (0: none)
    stall_ms: float = 0.0  # how long a stall holds the link
    seed: int | None = None

    PROFILES = {
        "wifi": {"delay_ms": 5, "jitter_ms": 8, "stall_every_s": 8, "stall_ms": 250},
        "4g": {"delay_ms": 40, "jitter_ms": 25, "stall_every_s": 6, "stall_ms": 700},
    }

    @classmethod
    def parse(cls, spec: str | None, seed: int | None = None) -> "Jitter | None":
        """``wifi``, ``4g`` or ``delay=20,jitter=10,stall_every=5,stall=400`` (ms, s, ms)."""
        if not spec or spec == "none":
            return None
        if spec in cls.PROFILES:
            return cls(**cls.PROFILES[spec], seed=seed)
        names = {"delay": "delay_ms", "jitter": "jitter_ms", "stall_every": "stall_every_s", "stall": "stall_ms"}
        values: dict[str, float] = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in names:
                raise ValueError(f"jitter: unknown {key!r} (wifi, 4g or delay=,jitter=,stall_every=,stall=)")
            values[names[key.strip()]] = float(value)
        return cls(**values, seed=seed)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._last = 0.0
        self._stall_until = 0.0
        self._next_stall: float | None = None

    def deliver_at(self, now: float, message: "str | bytes | None" = None) -> float:
        """When a message that left the server at ``now`` reaches the device (``message``, for
        links that treat some messages specially: scripted stalls in tests)."""
        if self.stall_every_s > 0:
            if self._next_stall is None:
                self._next_stall = now + self._rng.expovariate(1 / self.stall_every_s)
            if now >= self._next_stall:
                self._stall_until = now + self.stall_ms / 1000
                self._next_stall = now + self._rng.expovariate(1 / self.stall_every_s)
        extra = self._rng.expovariate(1000 / self.jitter_ms) if self.jitter_ms > 0 else 0.0
        at = max(now + self.delay_ms / 1000 + extra, self._stall_until, self._last)
        self._last = at
        return at
