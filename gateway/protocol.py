"""The device protocol as a pure, socket-free core: binary framing and JSON messages.

Everything here is plain functions and data classes: bytes or text in, typed values out, so
every rule of ``protocol.md`` is testable without a socket.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Union

SUPPORTED_VERSIONS = (1, 2, 3)
# The device sends at most 65 535 bytes per frame; anything bigger is not from a device.
MAX_FRAME_BYTES = 65535


class ProtocolError(ValueError):
    """A message that breaks the protocol. ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- binary framing


def parse_protocol_version(value: str | None) -> int:
    """The binary framing version from the ``Protocol-Version`` header (default 1)."""
    if value is None or value.strip() == "":
        return 1
    try:
        version = int(value.strip())
    except ValueError as exc:
        raise ProtocolError("bad_protocol_version", repr(value)) from exc
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError("bad_protocol_version", repr(value))
    return version


def decode_audio(data: bytes, version: int) -> tuple[bytes, int]:
    """Extract the Opus packet (and the v2 timestamp, else 0) from one uplink binary frame."""
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"{len(data)} bytes")
    if version == 1:
        if not data:
            raise ProtocolError("empty_frame")
        return data, 0
    if version == 2:
        if len(data) < 16:
            raise ProtocolError("short_header", f"v2 frame of {len(data)} bytes")
        ver, ftype, _reserved, timestamp, size = struct.unpack_from(">HHIII", data, 0)
        if ftype != 0:
            raise ProtocolError("not_audio", f"v2 type {ftype}")
        if size != len(data) - 16:
            raise ProtocolError("bad_length", f"v2 says {size}, has {len(data) - 16}")
        if size == 0:
            raise ProtocolError("empty_frame")
        return data[16:], timestamp
    if version == 3:
        if len(data) < 4:
            raise ProtocolError("short_header", f"v3 frame of {len(data)} bytes")
        ftype, _reserved, size = struct.unpack_from(">BBH", data, 0)
        if ftype != 0:
            raise ProtocolError("not_audio", f"v3 type {ftype}")
        if size != len(data) - 4:
            raise ProtocolError("bad_length", f"v3 says {size}, has {len(data) - 4}")
        if size == 0:
            raise ProtocolError("empty_frame")
        return data[4:], 0
    raise ProtocolError("bad_protocol_version", str(version))


def encode_audio(opus: bytes, version: int, timestamp: int = 0) -> bytes:
    """Wrap one downlink Opus packet in the framing of ``version``."""
    if version == 1:
        return opus
    if version == 2:
        return struct.pack(">HHIII", 2, 0, 0, timestamp & 0xFFFFFFFF, len(opus)) + opus
    if version == 3:
        if len(opus) > 0xFFFF:
            raise ProtocolError("frame_too_large", f"{len(opus)} bytes do not fit v3's 16-bit length")
        return struct.pack(">BBH", 0, 0, len(opus)) + opus
    raise ProtocolError("bad_protocol_version", str(version))


# --------------------------------------------------------------------------- device messages


@dataclass
class AudioParams:
    format: str = "opus"
    sample_rate: int = 16000
    channels: int = 1
    frame_duration: int = 60


@dataclass
class Hello:
    version: int | None = None
    transport: str | None = None
    features: dict[str, Any] = field(default_factory=dict)
    audio: AudioParams = field(default_factory=AudioParams)
    # The installed text font (firmware 2.4 glyph_push, §5.9), as sent; gateway/glyphs.py checks it.
    text_font: dict[str, Any] | None = None


@dataclass
class Listen:
    state: str  # start | stop | detect
    mode: str | None = None
    text: str | None = None


@dataclass
class Abort:
    reason: str | None = None


@dataclass
class Mcp:
    payload: dict[str, Any]


@dataclass
class Ping:
    pass


@dataclass
class Unknown:
    type: str
    raw: dict[str, Any]


DeviceMessage = Union[Hello, Listen, Abort, Mcp, Ping, Unknown]

_LISTEN_MODES = ("auto", "manual", "realtime")


def _int_or(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    try:
        return int(value)
    except (OverflowError, ValueError):  # Infinity, NaN: valid to json.loads, not numbers here
        return default


def parse_message(text: str) -> DeviceMessage:
    """Parse one text frame from a device. Raises :class:`ProtocolError` when it is unusable."""
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolError("frame_too_large", f"{len(text)} chars")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", str(exc)[:80]) from exc
    if not isinstance(obj, dict):
        raise ProtocolError("not_an_object")
    mtype = obj.get("type")
    if not isinstance(mtype, str):
        raise ProtocolError("missing_type")

    if mtype == "hello":
        # Every field is optional (protocol.md §3.1): a browser client sends none of them.
        params = obj.get("audio_params")
        audio = AudioParams()
        if isinstance(params, dict):
            rate = _int_or(params.get("sample_rate"), 16000)
            duration = _int_or(params.get("frame_duration"), 60)
            audio = AudioParams(
                format=str(params.get("format") or "opus"),
                sample_rate=rate if rate in (8000, 12000, 16000, 24000, 48000) else 16000,
                channels=1,
                frame_duration=duration if 10 <= duration <= 120 else 60,
            )
        features = obj.get("features")
        transport = obj.get("transport")
        return Hello(
            version=_int_or(obj.get("version"), 0) or None,
            transport=transport if isinstance(transport, str) else None,
            features=features if isinstance(features, dict) else {},
            audio=audio,
            text_font=obj["text_font"] if isinstance(obj.get("text_font"), dict) else None,
        )
    if mtype == "listen":
        state = obj.get("state")
        if state not in ("start", "stop", "detect"):
            raise ProtocolError("bad_listen_state", repr(state)[:40])
        mode = obj.get("mode")
        if state == "start":
            mode = mode if mode in _LISTEN_MODES else "auto"
        else:
            mode = None
        text_value = obj.get("text")
        if state == "detect" and not isinstance(text_value, str):
            raise ProtocolError("detect_without_text")
        return Listen(state=state, mode=mode, text=text_value if isinstance(text_value, str) else None)
    if mtype == "abort":
        reason = obj.get("reason")
        return Abort(reason=reason if isinstance(reason, str) else None)
    if mtype == "mcp":
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            raise ProtocolError("mcp_without_payload")
        return Mcp(payload=payload)
    if mtype == "ping":
        return Ping()
    return Unknown(type=mtype[:64], raw=obj)


# --------------------------------------------------------------------------- server messages


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def server_hello(session_id: str, sample_rate: int, frame_duration: int, version: int = 1) -> str:
    """The server hello: ``transport`` must be ``"websocket"`` or the firmware misbehaves."""
    return _dump(
        {
            "type": "hello",
            "version": version,
            "transport": "websocket",
            "session_id": session_id,
            "audio_params": {
                "format": "opus",
                "sample_rate": sample_rate,
                "channels": 1,
                "frame_duration": frame_duration,
            },
        }
    )


def _glyphs(message: dict[str, Any], glyph_push: dict[str, Any] | None) -> dict[str, Any]:
    if glyph_push:
        message["glyph_push"] = glyph_push
    return message


def stt(session_id: str, text: str, glyph_push: dict[str, Any] | None = None) -> str:
    return _dump(_glyphs({"type": "stt", "text": text, "session_id": session_id}, glyph_push))


def tts_start(session_id: str) -> str:
    return _dump({"type": "tts", "state": "start", "session_id": session_id})


def tts_stop(session_id: str) -> str:
    return _dump({"type": "tts", "state": "stop", "session_id": session_id})


def sentence_start(session_id: str, text: str, glyph_push: dict[str, Any] | None = None) -> str:
    return _dump(_glyphs({"type": "tts", "state": "sentence_start", "text": text, "session_id": session_id}, glyph_push))


EMOTION_EMOJI = {
    "neutral": "😶", "happy": "🙂", "laughing": "😆", "funny": "😂", "sad": "😔", "angry": "😠",
    "crying": "😭", "loving": "😍", "embarrassed": "😳", "surprised": "😯", "shocked": "😱",
    "thinking": "🤔", "winking": "😉", "cool": "😎", "relaxed": "😌", "delicious": "🤤",
    "kissy": "😘", "confident": "😏", "sleepy": "😴", "silly": "😜", "confused": "🙄",
}


def llm_emotion(session_id: str, emotion: str) -> str:
    emotion = emotion if emotion in EMOTION_EMOJI else "happy"
    return _dump({"type": "llm", "text": EMOTION_EMOJI[emotion], "emotion": emotion, "session_id": session_id})


def pong() -> str:
    import time

    return _dump({"type": "pong", "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")})
