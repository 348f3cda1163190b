"""Typed messages that travel between stages over NATS.

Every message of a turn carries the session id and the turn id, so that a stale turn can be
recognised and dropped anywhere ("turn fencing"). JSON messages are pydantic models; audio
travels as raw bytes with its metadata in NATS headers (see :class:`AudioFrameMeta`).
"""

from __future__ import annotations

import struct
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

ListenMode = Literal["auto", "manual", "realtime"]


def new_turn_id() -> str:
    """A fresh, unique turn id."""
    return uuid.uuid4().hex[:16]


def now_ms() -> int:
    return int(time.time() * 1000)


class Message(BaseModel):
    """Base class: JSON (de)serialisation to and from NATS payloads."""

    model_config = {"extra": "ignore"}

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes):
        return cls.model_validate_json(data)


class VadClaim(Message):
    """Gateway asks a VAD worker to own a session's uplink audio."""

    session_id: str
    device_id: str = ""
    sample_rate: int = 16000
    frame_duration: int = 60
    mode: ListenMode = "auto"


class VadClaimAck(Message):
    """A VAD worker has subscribed to the session and owns it now."""

    session_id: str
    worker_id: str


class Control(Message):
    """Session control, published by the gateway on ``xz.ctl.<S>``."""

    session_id: str
    # ``cancel``: turn ``turn_id`` was superseded by a newer one; stop working on it (unlike
    # ``abort``, which is the device's and also resets the VAD).
    kind: Literal["listen_start", "listen_stop", "detect", "abort", "close", "cancel"]
    mode: ListenMode | None = None
    turn_id: str | None = None
    text: str | None = None
    # Uplink audio frames the gateway queued before this message: the VAD's audio and control
    # subscriptions are served by separate tasks, so it holds a control message until it has
    # scored the frames that came before it (the wake word's pre-roll burst before `detect`).
    frames: int = 0
    # ``detect`` right after the pre-roll burst: a wake word. The burst is the start of the
    # utterance, not noise to drop; the VAD says whether a question followed (``wake_end`` or
    # ``wake_more``).
    wake: bool = False
    # ``abort`` for a voice barge-in: the speech that interrupted is the next turn, so the VAD
    # keeps the utterance it is hearing instead of resetting.
    keep_speech: bool = False


class Utterance(Message):
    """Metadata of one finished utterance, VAD -> ASR. The body follows the JSON header."""

    session_id: str
    turn_id: str
    device_id: str = ""
    sample_rate: int = 16000
    speech_end_ms: int = Field(default_factory=now_ms)
    frames: int = 0
    # The wake word this utterance began with (a question in the same breath): a transcript
    # that is that word alone is no question, and the gateway greets instead.
    wake_word: str = ""
    # The ASR worker that streamed this utterance while it was spoken (asr_svc/live.py): its
    # final text is asked of it; "" when it was not streamed.
    streamer: str = ""

    def pack(self, opus_frames: list[bytes]) -> bytes:
        """JSON header, then each Opus packet prefixed by its 2-byte big-endian length."""
        header = self.model_copy(update={"frames": len(opus_frames)}).encode()
        parts = [struct.pack(">I", len(header)), header]
        for frame in opus_frames:
            parts.append(struct.pack(">H", len(frame)))
            parts.append(frame)
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> tuple["Utterance", list[bytes]]:
        """Inverse of :meth:`pack`; raises ValueError on a truncated or malformed body."""
        if len(data) < 4:
            raise ValueError("utterance too short")
        (hlen,) = struct.unpack_from(">I", data, 0)
        if 4 + hlen > len(data):
            raise ValueError("utterance header truncated")
        meta = cls.decode(data[4 : 4 + hlen])
        frames: list[bytes] = []
        pos = 4 + hlen
        while pos < len(data):
            if pos + 2 > len(data):
                raise ValueError("utterance frame length truncated")
            (flen,) = struct.unpack_from(">H", data, pos)
            pos += 2
            if pos + flen > len(data):
                raise ValueError("utterance frame truncated")
            frames.append(data[pos : pos + flen])
            pos += flen
        if len(frames) != meta.frames:
            raise ValueError(f"utterance says {meta.frames} frames, body has {len(frames)}")
        return meta, frames


class UserTurn(Message):
    """One user turn as text, ASR or gateway -> LLM."""

    session_id: str
    turn_id: str
    device_id: str = ""
    text: str
    # asr: spoken; text: typed (listen detect); idle: the session went quiet, say goodbye.
    source: Literal["asr", "text", "idle"] = "asr"
    language: str | None = None
    speech_end_ms: int | None = None
    # The utterance's audio in the xz_audio object store (asr.keep_audio), for the history.
    audio: str | None = None


class SentenceJob(Message):
    """One sentence to synthesise, LLM -> TTS. ``seq`` orders sentences within a turn."""

    session_id: str
    turn_id: str
    seq: int
    text: str
    voice: str | None = None
    # The named TTS engine (tts.engines) the agent chose; None: by ``language``, else tts.engine.
    engine: str | None = None
    # The reply's language (the agent's, else the one the ASR heard): picks a voice that speaks it.
    language: str | None = None
    # Keep the frames for reuse (fixed phrases such as the wake-word greeting).
    cache: bool = False
    sample_rate: int = 24000
    frame_duration: int = 60


OutKind = Literal[
    "stt", "emotion", "sentence_start", "sentence_end", "turn_end", "error", "speech_start", "utterance", "discard", "busy",
    "progress", "wake_end", "wake_more", "failed",
]


class OutEvent(Message):
    """An event for the device, any stage -> the gateway holding the session (``xz.out.<S>``).

    - ``stt``: the recognised user text; opens the turn on the device.
    - ``emotion``: the reply's emotion, once per turn.
    - ``sentence_start`` / ``sentence_end``: brackets sentence ``seq``'s audio frames;
      ``sentence_end.frames`` says how many frames the sentence had.
    - ``turn_end``: no more sentences after ``sentences`` of them; ``close_after`` asks the
      gateway to close the connection once the reply has played.
    - ``error``: the turn failed; ``text`` is a short message for logs.
    - ``speech_start``: the VAD heard the user start speaking (``turn_id`` is empty); the
      gateway uses it for idle tracking and for voice barge-in in realtime mode.
    - ``utterance``: the VAD cut utterance ``turn_id`` and queued it for ASR; the gateway now
      expects its ``stt`` (or a ``discard``) and says sorry if neither comes in time.
    - ``discard``: ASR heard nothing worth answering in ``turn_id`` (noise, a cough).
    - ``busy``: a stage's queue was full and refused ``turn_id``: the gateway tells the user to
      try again.
    - ``failed``: no ASR engine (the chosen one, then the fallback) could transcribe
      ``turn_id``: the gateway says sorry (``error_text``) rather than leave the user in silence.
    - ``progress``: turn ``turn_id`` is waiting on a slow server tool that is still working (sent
      each second): the gateway's turn watchdog waits on.
    - ``wake_end``: after a wake word (``detect`` with ``wake``), the user said no more: the
      gateway greets. ``wake_more``: speech went on after the wake word (a question in one
      breath): no greeting, the utterance (wake word and question) is the next turn.
    """

    kind: OutKind
    session_id: str
    turn_id: str
    seq: int = 0
    text: str = ""
    emotion: str = ""
    frames: int = 0
    sentences: int = 0
    close_after: bool = False
    # On stt: when the user stopped speaking (ms since the epoch), for the voice-to-voice metric.
    speech_end_ms: int | None = None


# Audio frames on xz.out.<S> carry their metadata in NATS headers.
HDR_KIND = "Xz-Kind"
HDR_TURN = "Xz-Turn"
HDR_SEQ = "Xz-Seq"
HDR_INDEX = "Xz-Index"
# On a sample of uplink frames: when the gateway received it (Unix seconds), for the VAD's
# frame-lag histogram.
HDR_RECEIVED = "Xz-Rx"
# A tools worker still working on a call says so every second on the caller's inbox, so the
# caller can tell a slow tool from a dead worker.
HDR_PROGRESS = "Xz-Progress"
KIND_AUDIO = "audio"


class AudioFrameMeta(BaseModel):
    """Metadata of one downlink Opus frame: which turn, which sentence, which frame."""

    turn_id: str
    seq: int
    index: int

    def headers(self) -> dict[str, str]:
        return {
            HDR_KIND: KIND_AUDIO,
            HDR_TURN: self.turn_id,
            HDR_SEQ: str(self.seq),
            HDR_INDEX: str(self.index),
        }

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> "AudioFrameMeta | None":
        """The frame's metadata, or None when the headers do not describe an audio frame."""
        if not headers or headers.get(HDR_KIND) != KIND_AUDIO:
            return None
        try:
            return cls(
                turn_id=headers[HDR_TURN], seq=int(headers[HDR_SEQ]), index=int(headers[HDR_INDEX])
            )
        except (KeyError, ValueError):
            return None


class ToolCall(Message):
    """Request to a tools worker: call ``name`` with ``arguments``."""

    session_id: str = ""
    turn_id: str = ""
    device_id: str = ""
    name: str
    arguments: dict = Field(default_factory=dict)
    # Where a tool that plays media puts its audio in the turn: the next free sentence number,
    # and the device's downlink format.
    seq: int = 0
    sample_rate: int = 24000
    frame_duration: int = 60
    voice: str | None = None
    engine: str | None = None  # the agent's TTS engine, for what the tool says itself
    # The reply's language ("zh", "en"...; None: English): tools answer in it.
    language: str | None = None
    # What the user said this turn (context for tools whose arguments a small model may miss).
    utterance: str = ""


class ToolResult(Message):
    """A tool's answer.

    ``action`` says what the LLM worker does with it: ``response`` speaks ``text`` directly,
    ``reqllm`` feeds it back to the LLM, ``none`` only records it, ``error`` means the call failed.
    """

    name: str
    ok: bool = True
    action: Literal["response", "reqllm", "none", "error"] = "reqllm"
    text: str = ""
    # Close the session once this turn's reply has played (an exit intent).
    close_after: bool = False
    # Sentence numbers the tool used itself (e.g. play_music: its intro and the music).
    seqs_used: int = 0


class ToolSpec(Message):
    """One tool's OpenAI-style function schema."""

    name: str
    description: str
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    # Words that show a request is about this tool. Small models over-call tools, so by
    # default a tool is offered only on turns that mention one of these (see llm_svc.tools).
    keywords: list[str] = Field(default_factory=list)

    def openai(self) -> dict:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolList(Message):
    tools: list[ToolSpec] = Field(default_factory=list)


class DeviceMcpRequest(Message):
    """Request/reply on ``xz.device.<S>.mcp``: list or call the device's own MCP tools."""

    method: Literal["tools/list", "tools/call"]
    name: str = ""
    arguments: dict = Field(default_factory=dict)
    turn_id: str = ""


class DeviceTool(BaseModel):
    name: str  # the device's name (self.audio_speaker.set_volume)
    llm_name: str  # sanitised for LLM function names (self_audio_speaker_set_volume)
    description: str = ""
    input_schema: dict = Field(default_factory=dict)


class DeviceMcpReply(Message):
    ok: bool = True
    text: str = ""
    tools: list[DeviceTool] = Field(default_factory=list)


class SessionEnd(Message):
    """A device's session is over (published by the gateway on ``xz.session.end``)."""

    session_id: str
    device_id: str = ""
