"""``funasr``: the FunASR runtime server's WebSocket protocol (funasr-wss-server,
funasr-wss-server-2pass, and the Python ``funasr_wss_server.py``).

As modelscope/FunASR documents it (runtime/docs/websocket_protocol.md) and its clients speak it
(runtime/python/websocket/funasr_wss_client.py, runtime/websocket/bin/*.cpp):

1. the client opens ``ws://`` or ``wss://`` (the C++ server's default certificate is
   self-signed: ``verify_tls: false``) with the subprotocol ``binary``;
2. sends one JSON text message: ``mode`` (offline, online, 2pass), ``chunk_size``,
   ``chunk_interval``, ``encoder_chunk_look_back``, ``decoder_chunk_look_back``, ``audio_fs``,
   ``wav_name``, ``wav_format`` ("pcm"), ``is_speaking`` true, ``hotwords`` (the JSON *string*
   of ``{word: weight}``), ``itn``, and here ``svs_lang`` (SenseVoice's language) when known;
3. sends the 16 kHz int16 PCM as binary frames, then ``{"is_speaking": false}``.

The server answers JSON text messages ``{"mode", "text", "wav_name", "is_final", ...}``:
``online``/``2pass-online`` are partial results (each carries the new text since the last);
``2pass-offline`` is the corrected text of one VAD sentence; in 2pass and online mode the
message with ``is_final: true`` after the end of audio closes the utterance. The C++ offline
server answers once, ``mode: "offline"``, with ``is_final`` *false* (runtime/websocket/bin/
websocket-server.cpp): that message is the final. A final whose text starts ``ERROR.`` is the
server refusing the audio (the 2pass server's "ONLY SUPPORT PCM stream").

The server has no keys and no quota; what fails is the connection (nothing listening, closed
mid-utterance), silence (the stage's timeout), a frame that is not such JSON, and a final with
no text (``protocol``) or an empty one (``server``: speech in, nothing out; the fallback decides).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np

from asr_svc.engine import Transcript
from asr_svc.providers import SAMPLE_RATE, AsrRequest, EngineError, StreamingEngine, register
from shared.settings import AsrSettings

log = logging.getLogger("asr_svc.remote.funasr")

PARTIAL_MODES = ("online", "2pass-online")


def start_message(cfg: Any, request: AsrRequest) -> str:
    """The first (JSON text) message of an utterance."""
    message: dict[str, Any] = {
        "mode": cfg.mode,
        "chunk_size": list(cfg.chunk_size),
        "chunk_interval": cfg.chunk_interval,
        "encoder_chunk_look_back": cfg.encoder_chunk_look_back,
        "decoder_chunk_look_back": cfg.decoder_chunk_look_back,
        "audio_fs": SAMPLE_RATE,
        "wav_name": cfg.wav_name,
        "wav_format": "pcm",
        "is_speaking": True,
        "hotwords": hotwords_field(request.hotwords, cfg.hotword_weight),
        "itn": bool(cfg.itn),
    }
    if request.language and cfg.send_language:
        message["svs_lang"] = request.language.split("-")[0].lower()
    return json.dumps(message, ensure_ascii=False)


def hotwords_field(words: list[str], weight: int) -> str:
    """``hotwords`` is a string holding JSON ``{word: weight}``; "" when there are none."""
    table = {w.strip(): weight for w in words if w and w.strip()}
    return json.dumps(table, ensure_ascii=False) if table else ""


END_MESSAGE = json.dumps({"is_speaking": False})


def frame_bytes(cfg: Any) -> int:
    """Bytes of PCM per binary frame, as the reference client cuts them:
    60 ms * chunk_size[1] / chunk_interval."""
    ms = 60 * cfg.chunk_size[1] / max(1, cfg.chunk_interval)
    return max(2, int(ms * SAMPLE_RATE / 1000) * 2)


def parse_message(data: str) -> dict[str, Any]:
    """One server message: a JSON object, or :class:`EngineError` ``protocol`` quoting it."""
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise EngineError("protocol", f"not a FunASR message: {data[:200]!r}") from exc
    if not isinstance(message, dict):
        raise EngineError("protocol", f"not a FunASR message: {data[:200]!r}")
    return message


@dataclass
class Results:
    """What the server has said about one utterance."""

    mode: str
    ended: bool = False  # {"is_speaking": false} sent
    online: str = ""  # partial text since the last corrected sentence
    sentences: list[str] = field(default_factory=list)  # 2pass-offline / offline texts
    partials: int = 0
    final: dict[str, Any] | None = None

    def partial_text(self) -> str:
        return "".join(self.sentences) + self.online

    def take(self, message: dict[str, Any]) -> str | None:
        """Take one message in; the partial text to show when it is a partial, else None.
        Sets :attr:`final` when the message closes the utterance."""
        mode = message.get("mode")
        text = message.get("text")
        is_final = bool(message.get("is_final"))
        if isinstance(text, str) and text.startswith("ERROR."):
            raise EngineError("bad_audio", f"FunASR: {text[:300]}")
        if mode in PARTIAL_MODES and not is_final:
            if isinstance(text, str) and text:
                self.online += text
                self.partials += 1
                return self.partial_text()
            return None
        if mode == "offline" and self.mode == "offline":
            # The C++ offline server's one answer (is_final false there, true in the Python one).
            self.final = message
            return None
        if mode in ("2pass-offline", "offline"):
            if isinstance(text, str) and text:
                self.sentences.append(text)
            self.online = ""
        elif mode in PARTIAL_MODES and isinstance(text, str) and text:
            self.online += text  # a last online piece that closes the utterance (online mode)
        if is_final and self.ended:
            self.final = message
        return None

    def text(self) -> str:
        """The final text, or :class:`EngineError` when the final carries none."""
        final = self.final or {}
        if self.mode == "offline":
            text = final.get("text")
            if not isinstance(text, str):
                raise EngineError("protocol", f"FunASR final without text: {json.dumps(final, ensure_ascii=False)[:200]}")
        else:
            if not isinstance(final.get("text"), str) and not self.sentences:
                raise EngineError("protocol", f"FunASR final without text: {json.dumps(final, ensure_ascii=False)[:200]}")
            # 2pass: the corrected sentences; online (or a 2pass final with none): the partials.
            text = "".join(self.sentences) if self.mode == "2pass" and self.sentences else self.online
        text = text.strip()
        if not text:
            raise EngineError("server", f"FunASR final with empty text: {json.dumps(final, ensure_ascii=False)[:200]}")
        return text


class FunAsrStream:
    def __init__(self, engine: "FunAsrEngine", ws: aiohttp.ClientWebSocketResponse, request: AsrRequest, on_partial: Callable[[str], Awaitable[None]] | None) -> None:
        self.engine = engine
        self.ws = ws
        self.request = request
        self.on_partial = on_partial
        self.results = Results(engine.cfg.mode)
        self.samples = 0
        self._buffer = b""
        self._frame = frame_bytes(engine.cfg)
        self._done = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    partial = self.results.take(parse_message(msg.data))
                    if partial is not None and self.on_partial is not None:
                        await self.on_partial(partial)
                    if self.results.final is not None:
                        self._settle(None)
                        return
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    raise EngineError("protocol", f"binary frame from the FunASR server: {msg.data[:60]!r}")
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    raise EngineError("server", f"FunASR connection failed mid-utterance: {self.ws.exception()}")
            raise EngineError("server", f"FunASR server closed the connection before the final text (close code {self.ws.close_code})")
        except EngineError as exc:
            self._settle(exc)
        except asyncio.CancelledError:
            self._settle(EngineError("server", "cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - the connection itself
            self._settle(EngineError("server", f"FunASR connection failed mid-utterance: {exc}"))

    def _settle(self, error: EngineError | None) -> None:
        if not self._done.done():
            if error is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(error)

    async def _lost(self, exc: BaseException) -> EngineError:
        """The error to raise when a write fails: what the reader saw, if it saw anything."""
        try:
            await asyncio.wait_for(asyncio.shield(self._done), 1.0)
        except EngineError as seen:
            return seen
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            pass
        return EngineError("server", f"FunASR connection lost mid-utterance: {exc or type(exc).__name__}")

    async def _write(self, data: bytes | str) -> None:
        if self._done.done():
            self._done.result()  # raises what the reader saw (the final came early: nothing)
            raise EngineError("protocol", "FunASR server sent its final before the end of the audio")
        try:
            if isinstance(data, str):
                await self.ws.send_str(data)
            else:
                await self.ws.send_bytes(data)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise await self._lost(exc) from exc

    async def send(self, pcm: np.ndarray) -> None:
        data = np.asarray(pcm, dtype="<i2").tobytes()
        self.samples += len(data) // 2
        self._buffer += data
        while len(self._buffer) >= self._frame:
            chunk, self._buffer = self._buffer[: self._frame], self._buffer[self._frame :]
            await self._write(chunk)

    async def finish(self) -> Transcript:
        try:
            if self._buffer:
                chunk, self._buffer = self._buffer, b""
                await self._write(chunk)
            await self._write(END_MESSAGE)
            self.results.ended = True
            await asyncio.shield(self._done)
            text = self.results.text()
        finally:
            await self.cancel()
        log.info(
            "FunASR final",
            extra={"fields": {"engine": self.engine.name, "mode": self.results.mode, "partials": self.results.partials, "sentences": len(self.results.sentences), "audio_s": round(self.samples / SAMPLE_RATE, 2)}},
        )
        language = self.request.language.split("-")[0] if self.request.language else None
        return Transcript(text=text, language=language, audio_s=self.samples / SAMPLE_RATE)

    async def cancel(self) -> None:
        if not self._reader.done():
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if not self._done.done():
            self._done.cancel()
        elif not self._done.cancelled():
            self._done.exception()  # retrieved: no "never retrieved" warning
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), 2.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass


class FunAsrEngine(StreamingEngine):
    type = "funasr"

    def __init__(self, name: str, cfg: Any, asr: AsrSettings) -> None:
        self.name = name
        self.cfg = cfg
        self.timeout_s = cfg.timeout_s
        self.chunk_ms = max(20, int(60 * cfg.chunk_size[1] / max(1, cfg.chunk_interval)))
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def open_stream(self, request: AsrRequest, on_partial: Callable[[str], Awaitable[None]] | None = None) -> FunAsrStream:
        url = self.cfg.url
        ssl: Any = True if self.cfg.verify_tls else False  # False: the self-signed default certificate
        try:
            ws = await self._client().ws_connect(url, protocols=("binary",), ssl=ssl, heartbeat=None, autoping=True, timeout=aiohttp.ClientWSTimeout(ws_close=2.0), max_msg_size=16 * 1024 * 1024)
        except aiohttp.WSServerHandshakeError as exc:
            raise EngineError("unavailable", f"{url}: WebSocket handshake refused: HTTP {exc.status} {exc.message}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineError("unavailable", f"{url}: {exc}") from exc
        stream = FunAsrStream(self, ws, request, on_partial)
        try:
            await stream._write(start_message(self.cfg, request))
        except BaseException:
            await stream.cancel()
            raise
        return stream

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


register("funasr", FunAsrEngine)
