"""``doubao``: Volcengine's big-model streaming ASR (豆包流式语音识别, "sauc bigmodel").

The protocol, as the vendor documents it ("大模型流式语音识别API",
https://www.volcengine.com/docs/6561/1354869) and as its Python demo (sauc_websocket_demo.py in
the doc's sauc_python.zip) speaks it:

- a WebSocket to ``wss://openspeech.bytedance.com/api/v3/sauc/bigmodel`` (bidirectional),
  ``.../bigmodel_async`` (bidirectional, answers only when the text changes) or
  ``.../bigmodel_nostream`` (text at the last packet; the only one taking ``audio.language``);
  the handshake carries ``X-Api-App-Key`` (the app id), ``X-Api-Access-Key`` (the access
  token), ``X-Api-Resource-Id`` and ``X-Api-Connect-Id``; the server answers ``X-Tt-Logid``.
  A refused key is refused at the handshake (HTTP 401/403, never upgraded).
- binary frames: a 4-byte header (version 1 | header size 1; message type | flags;
  serialization | compression; reserved), then, as the flags say, a big-endian int32 sequence,
  then a uint32 payload size and the payload (gzip here, both ways). Error frames (type
  0b1111) carry a uint32 error code, a uint32 size and the message.
- the client sends the full client request (JSON: user, audio, request) with sequence 1, then
  audio-only requests with sequences 2, 3, ...; the last one with the flags 0b0011 and its
  sequence negated. Each server response carries ``result.text`` (the whole text so far) and,
  with ``show_utterances``, ``result.utterances[{text, definite}]``; the one with the last-packet
  flag is final.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from asr_svc.engine import Transcript
from asr_svc.providers import SAMPLE_RATE, AsrRequest, EngineError, StreamingEngine, register
from shared.settings import AsrSettings

log = logging.getLogger("asr_svc.remote.doubao")

PROTOCOL_VERSION = 0b0001
HEADER_SIZE = 0b0001  # in 4-byte words

FULL_CLIENT_REQUEST = 0b0001
AUDIO_ONLY_REQUEST = 0b0010
FULL_SERVER_RESPONSE = 0b1001
SERVER_ERROR = 0b1111

# Message-type-specific flags.
NO_SEQUENCE = 0b0000
POS_SEQUENCE = 0b0001
LAST_NO_SEQUENCE = 0b0010  # the last packet, no sequence field
LAST_NEG_SEQUENCE = 0b0011  # the last packet, with its sequence negated
FLAG_SEQUENCE = 0b0001
FLAG_LAST = 0b0010
FLAG_EVENT = 0b0100  # an int32 event follows (the demo's parser knows it; this endpoint sends none)

NO_SERIALIZATION = 0b0000
JSON = 0b0001
NO_COMPRESSION = 0b0000
GZIP = 0b0001

# The vendor's error codes (doc 6561/1354869 "错误码"), and what they mean for the fallback.
ERROR_CODES = {
    20000000: "成功",
    45000001: "请求参数无效",
    45000002: "空音频",
    45000081: "等包超时",
    45000151: "音频格式不正确",
    55000031: "服务器繁忙",
}


class ProtocolError(ValueError):
    """Bytes that are not a frame of this protocol."""


@dataclass
class Frame:
    message_type: int
    flags: int
    serialization: int
    compression: int
    sequence: int | None = None
    code: int | None = None  # error frames
    payload: Any = None  # JSON-decoded, or bytes (audio), or str (an error message)

    @property
    def last(self) -> bool:
        return bool(self.flags & FLAG_LAST)


def header(message_type: int, flags: int, serialization: int, compression: int) -> bytes:
    return bytes([(PROTOCOL_VERSION << 4) | HEADER_SIZE, (message_type << 4) | flags, (serialization << 4) | compression, 0])


def encode_frame(message_type: int, flags: int, payload: bytes, *, serialization: int, compression: int = GZIP, sequence: int | None = None, code: int | None = None) -> bytes:
    """One frame; ``payload`` already serialized, compressed here as ``compression`` says."""
    body = gzip.compress(payload) if compression == GZIP else payload
    out = bytearray(header(message_type, flags, serialization, compression))
    if code is not None:
        out += struct.pack(">I", code)
    elif flags & FLAG_SEQUENCE:
        if sequence is None:
            raise ValueError("these flags need a sequence")
        out += struct.pack(">i", sequence)
    out += struct.pack(">I", len(body))
    out += body
    return bytes(out)


def full_client_request(params: dict, sequence: int = 1) -> bytes:
    return encode_frame(FULL_CLIENT_REQUEST, POS_SEQUENCE, json.dumps(params, ensure_ascii=False).encode("utf-8"), serialization=JSON, sequence=sequence)


def audio_request(pcm: bytes, sequence: int, last: bool = False) -> bytes:
    """An audio-only request: ``sequence`` positive; the last one goes negated."""
    if last:
        return encode_frame(AUDIO_ONLY_REQUEST, LAST_NEG_SEQUENCE, pcm, serialization=NO_SERIALIZATION, sequence=-abs(sequence))
    return encode_frame(AUDIO_ONLY_REQUEST, POS_SEQUENCE, pcm, serialization=NO_SERIALIZATION, sequence=sequence)


def server_response(result: dict, sequence: int, last: bool = False) -> bytes:
    """A full server response (what the stand-in sends)."""
    flags = LAST_NEG_SEQUENCE if last else POS_SEQUENCE
    return encode_frame(FULL_SERVER_RESPONSE, flags, json.dumps(result, ensure_ascii=False).encode("utf-8"), serialization=JSON, sequence=sequence)


def error_frame(code: int, message: str) -> bytes:
    """A server error frame: code, size, the message (UTF-8), uncompressed as the doc's example."""
    return encode_frame(SERVER_ERROR, NO_SEQUENCE, message.encode("utf-8"), serialization=JSON, compression=NO_COMPRESSION, code=code)


def decode_frame(data: bytes) -> Frame:
    """Parse one frame, client's or server's; :class:`ProtocolError` for anything else."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 4:
        raise ProtocolError(f"not a frame: {bytes(data[:16]) if isinstance(data, (bytes, bytearray)) else type(data).__name__!r}")
    version, size = data[0] >> 4, data[0] & 0x0F
    if version != PROTOCOL_VERSION or size < 1:
        raise ProtocolError(f"not a frame (version {version}, header size {size}): {bytes(data[:16])!r}")
    message_type, flags = data[1] >> 4, data[1] & 0x0F
    serialization, compression = data[2] >> 4, data[2] & 0x0F
    if message_type not in (FULL_CLIENT_REQUEST, AUDIO_ONLY_REQUEST, FULL_SERVER_RESPONSE, SERVER_ERROR):
        raise ProtocolError(f"unknown message type {message_type:#06b}")
    if compression not in (NO_COMPRESSION, GZIP) or serialization not in (NO_SERIALIZATION, JSON):
        raise ProtocolError(f"unknown serialization/compression {data[2]:#04x}")
    pos = size * 4
    frame = Frame(message_type, flags, serialization, compression)
    try:
        if message_type == SERVER_ERROR:
            (frame.code,) = struct.unpack_from(">I", data, pos)
            pos += 4
        else:
            if flags & FLAG_SEQUENCE:
                (frame.sequence,) = struct.unpack_from(">i", data, pos)
                pos += 4
            if flags & FLAG_EVENT:
                pos += 4
        (length,) = struct.unpack_from(">I", data, pos)
    except struct.error as exc:
        raise ProtocolError(f"frame cut short ({len(data)} bytes)") from exc
    pos += 4
    body = bytes(data[pos : pos + length])
    if len(body) != length:
        raise ProtocolError(f"payload size {length} but {len(body)} bytes follow")
    if compression == GZIP:
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise ProtocolError(f"payload is not gzip: {exc}") from exc
    if message_type == SERVER_ERROR:
        # The doc's table says a UTF-8 string; its example says a JSON object: take either.
        text = body.decode("utf-8", "replace")
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):
                text = str(obj.get("error") or obj.get("message") or text)
            elif isinstance(obj, str):
                text = obj
        except ValueError:
            pass
        frame.payload = text
    elif serialization == JSON:
        try:
            frame.payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"payload is not JSON: {body[:80]!r}") from exc
    else:
        frame.payload = body
    return frame


def hotword_context(hotwords: list[str]) -> str:
    """``request.corpus.context``: a JSON *string* ``{"hotwords": [{"word": ...}]}`` (doc: 热词直传)."""
    return json.dumps({"hotwords": [{"word": w} for w in hotwords]}, ensure_ascii=False)


# AsrRequest.language (ISO 639-1) to the vendor's language keys (doc: audio.language).
LANGUAGES = {"en": "en-US", "ja": "ja-JP", "id": "id-ID", "es": "es-MX", "pt": "pt-BR", "de": "de-DE", "fr": "fr-FR", "ko": "ko-KR", "fil": "fil-PH", "ms": "ms-MY", "th": "th-TH", "ar": "ar-SA", "zh": "zh-CN"}


def vendor_language(language: str | None) -> str | None:
    if not language:
        return None
    if "-" in language:
        return language
    return LANGUAGES.get(language.lower())


def request_params(cfg: Any, request: AsrRequest, url: str) -> dict:
    """The full client request's JSON."""
    audio: dict[str, Any] = {"format": "pcm", "codec": "raw", "rate": SAMPLE_RATE, "bits": 16, "channel": 1}
    # Only the streaming-input endpoint takes a language; elsewhere the model hears zh and en.
    language = vendor_language(getattr(cfg, "language", None) or request.language)
    if language and url.rstrip("/").endswith("bigmodel_nostream"):
        audio["language"] = language
    params: dict[str, Any] = {
        "user": {"uid": getattr(cfg, "uid", "") or request.session_id or "xiaozhi"},
        "audio": audio,
        "request": {
            "model_name": getattr(cfg, "model_name", "bigmodel"),
            "enable_itn": getattr(cfg, "enable_itn", True),
            "enable_punc": getattr(cfg, "enable_punc", True),
            "show_utterances": True,
            "result_type": "full",
        },
    }
    if request.hotwords:
        params["request"]["corpus"] = {"context": hotword_context(request.hotwords)}
    return params


def reason_for_code(code: int, message: str) -> str:
    lowered = message.lower()
    if "quota exceeded" in lowered:
        return "quota" if "lifetime" in lowered else "rate_limited"
    if code in (45000010, 45000030) or "grant" in lowered:
        return "auth"
    if code in (45000002, 45000151):
        return "bad_audio"
    if code == 55000031:
        return "rate_limited"
    if code == 45000001 or code == 45000081:
        return "protocol"
    if 55000000 <= code < 56000000:
        return "server"
    return "server" if code >= 50000000 else "protocol"


def _final_text(payload: Any) -> str:
    if not isinstance(payload, dict):
        raise ProtocolError(f"server response is not an object: {str(payload)[:80]}")
    result = payload.get("result")
    if result is None:
        return ""
    if isinstance(result, list):  # the doc's table calls it a list; its example an object
        result = result[0] if result else {}
    if not isinstance(result, dict):
        raise ProtocolError(f"result is not an object: {str(result)[:80]}")
    text = result.get("text", "")
    if not isinstance(text, str):
        raise ProtocolError("result.text is not a string")
    return text


def _handshake_error(status: int, headers: Any, body: bytes) -> EngineError:
    """An HTTP answer instead of the upgrade: the vendor's code and message from the body (or the
    X-Api-Status-Code/X-Api-Message headers)."""
    code: Any = headers.get("X-Api-Status-Code") if headers is not None else None
    message = headers.get("X-Api-Message") if headers is not None else None
    text = body[:300].decode("utf-8", "replace")
    try:
        obj = json.loads(body)
        if isinstance(obj, dict):
            code = obj.get("code", code)
            err = obj.get("message") or obj.get("error")
            if isinstance(err, dict):
                err = err.get("message")
            message = err or message
    except ValueError:
        pass
    message = str(message or text or "").strip()[:300]
    logid = headers.get("X-Tt-Logid", "") if headers is not None else ""
    if status in (401, 403):
        reason = "auth"
    elif status == 429:
        reason = "quota" if "lifetime" in message.lower() else "rate_limited"
    elif status >= 500:
        reason = "server"
    else:
        reason = "protocol"
    return EngineError(reason, f"HTTP {status} {code or ''}: {message}".replace("  ", " ") + (f" (logid {logid})" if logid else ""))


class DoubaoStream:
    """One utterance on one WebSocket: audio goes out as :meth:`send` is called; a reader task
    takes the server's responses, hands changing text to ``on_partial``, and keeps the final."""

    def __init__(self, engine: "DoubaoAsrEngine", request: AsrRequest, on_partial: Callable[[str], Awaitable[None]] | None) -> None:
        self.engine = engine
        self.request = request
        self.on_partial = on_partial
        self.ws: Any = None
        self.logid = ""
        self.sequence = 1
        self.pending: bytes | None = None  # held back so the last packet carries audio
        self.samples = 0
        self.partials = 0
        self.responses = 0
        self.last_text = ""
        self.final: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task | None = None
        self.finished = False

    async def open(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, InvalidStatus

        cfg = self.engine.cfg
        headers = {
            "X-Api-App-Key": cfg.app_key,
            "X-Api-Access-Key": cfg.key() or "",
            "X-Api-Resource-Id": cfg.resource_id,
            "X-Api-Connect-Id": str(uuid.uuid4()),
        }
        url = cfg.url
        try:
            self.ws = await connect(url, additional_headers=headers, proxy=None, compression=None, open_timeout=self.engine.timeout_s, max_size=4 * 1024 * 1024)
        except InvalidStatus as exc:
            resp = exc.response
            raise _handshake_error(resp.status_code, resp.headers, resp.body or b"") from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise EngineError("unavailable", f"{url}: {exc or type(exc).__name__}") from exc
        except InvalidHandshake as exc:
            raise EngineError("protocol", f"{url}: handshake: {exc}") from exc
        self.logid = self.ws.response.headers.get("X-Tt-Logid", "") if self.ws.response is not None else ""
        await self._send(full_client_request(request_params(cfg, self.request, url), self.sequence))
        self.reader = asyncio.create_task(self._read(), name="doubao-reader")

    async def _send(self, frame: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self.final.cancelled():
            raise EngineError("protocol", "the stream was cancelled")
        if self.final.done() and self.final.exception() is not None:
            raise self.final.exception()  # type: ignore[misc]
        try:
            await self.ws.send(frame)
        except ConnectionClosed as exc:
            await self._settle()
            raise EngineError("unavailable", f"connection closed while sending: {exc}") from exc

    async def _settle(self) -> None:
        """After a failed send: let the reader say why the server closed, if it can."""
        if self.reader is not None and not self.final.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.final), 1.0)
            except BaseException:  # noqa: BLE001 - only waiting for its verdict
                pass
        if self.final.done() and self.final.exception() is not None:
            raise self.final.exception()  # type: ignore[misc]

    def _fail(self, exc: EngineError) -> None:
        if not self.final.done():
            self.final.set_exception(exc)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                if isinstance(message, str):
                    raise ProtocolError(f"text message on a binary protocol: {message[:80]!r}")
                frame = decode_frame(message)
                if frame.message_type == SERVER_ERROR:
                    text = str(frame.payload or ERROR_CODES.get(frame.code or 0, ""))
                    self._fail(EngineError(reason_for_code(frame.code or 0, text), f"error {frame.code}: {text}" + (f" (logid {self.logid})" if self.logid else "")))
                    return
                if frame.message_type != FULL_SERVER_RESPONSE:
                    raise ProtocolError(f"unexpected message type {frame.message_type:#06b} from the server")
                self.responses += 1
                text = _final_text(frame.payload)
                if frame.last:
                    if not self.final.done():
                        self.final.set_result(text)
                    return
                if text and text != self.last_text:
                    self.last_text = text
                    self.partials += 1
                    if self.on_partial is not None:
                        await self.on_partial(text)
            self._fail(EngineError("unavailable", f"connection closed before the final text (code {self.ws.close_code}) after {self.responses} responses"))
        except ProtocolError as exc:
            self._fail(EngineError("protocol", f"not the sauc protocol: {exc}"))
        except ConnectionClosed as exc:
            self._fail(EngineError("unavailable", f"connection dropped mid-utterance after {self.responses} responses: {exc}"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever else the reader meets ends the utterance
            self._fail(EngineError("protocol", f"{type(exc).__name__}: {exc}"))

    async def send(self, pcm: np.ndarray) -> None:
        data = np.asarray(pcm, dtype="<i2").tobytes()
        if not data:
            return
        self.samples += len(data) // 2
        if self.pending is not None:
            self.sequence += 1
            await self._send(audio_request(self.pending, self.sequence))
        self.pending = data

    async def finish(self) -> Transcript:
        self.sequence += 1
        await self._send(audio_request(self.pending or b"", self.sequence, last=True))
        self.pending = None
        try:
            text = await self.final
        finally:
            self.finished = True
            await self._close()
        log.info(
            "doubao stream finished",
            extra={"fields": {"engine": self.engine.name, "logid": self.logid, "responses": self.responses, "partials": self.partials, "audio_s": round(self.samples / SAMPLE_RATE, 2)}},
        )
        return Transcript(text=text.strip(), language=self.request.language, audio_s=self.samples / SAMPLE_RATE)

    async def _close(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()
            try:
                await self.reader
            except BaseException:  # noqa: BLE001
                pass
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 2.0)
            except BaseException:  # noqa: BLE001 - closing a broken socket
                pass
        if self.final.done() and not self.final.cancelled():
            self.final.exception()  # retrieved: no "never retrieved" warning

    async def cancel(self) -> None:
        if not self.final.done():
            self.final.cancel()
        await self._close()


class DoubaoAsrEngine(StreamingEngine):
    type = "doubao"
    chunk_ms = 200  # the doc: 100-200 ms a packet, 200 ms best for the bidirectional mode

    def __init__(self, name: str, cfg: Any, asr: AsrSettings) -> None:
        self.name = name
        self.cfg = cfg
        self.timeout_s = cfg.timeout_s

    async def open_stream(self, request: AsrRequest, on_partial: Callable[[str], Awaitable[None]] | None = None) -> DoubaoStream:
        stream = DoubaoStream(self, request, on_partial)
        try:
            await stream.open()
        except BaseException:
            await stream.cancel()
            raise
        return stream


register("doubao", DoubaoAsrEngine)
