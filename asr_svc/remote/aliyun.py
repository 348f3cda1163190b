"""``aliyun``: DashScope realtime speech recognition (Paraformer realtime, Fun-ASR realtime) over
its WebSocket task protocol.

Sources (Alibaba Cloud Model Studio): "WebSocket API" for Paraformer real-time speech recognition
(help.aliyun.com/zh/model-studio/websocket-for-paraformer-real-time-service), its client events
(alibabacloud.com/help/en/model-studio/paraformer-client-events), server events
(.../paraformer-server-events), the Fun-ASR client events (help.aliyun.com/en/model-studio/
fun-asr-client-events), the Model Studio error codes (help.aliyun.com/en/model-studio/error-code)
and the official SDK's ``dashscope/audio/asr/recognition.py`` (dashscope/dashscope-sdk-python).

The exchange, one task per connection here:

1. open ``wss://.../api-ws/v1/inference`` with ``Authorization: Bearer <key>`` (optionally
   ``X-DashScope-WorkSpace``, ``X-DashScope-DataInspection: enable``); a wrong or missing key
   fails the handshake with HTTP 401 or 403;
2. send the text frame ``run-task`` (``header.action``, ``header.task_id``, ``header.streaming:
   duplex``; ``payload.task_group: audio``, ``task: asr``, ``function: recognition``, ``model``,
   ``parameters`` {``format``, ``sample_rate``, ``vocabulary_id``, ``language_hints``, ...},
   ``input: {}``) and wait for the ``task-started`` event;
3. send the audio as binary frames (here raw 16 kHz mono s16le, ``format: pcm``); the server
   answers ``result-generated`` events whose ``payload.output.sentence`` has ``text``,
   ``begin_time``, ``end_time``, ``sentence_end`` (false: an intermediate result of the sentence,
   true: its final text) and ``heartbeat`` (true: skip it);
4. send ``finish-task``; the last results come, then ``task-finished``. A ``task-failed`` event
   (``header.error_code``, ``header.error_message``) ends the task instead, at any point.

Hotwords: the protocol has no per-request hotword list, only ``vocabulary_id`` (a list created
beforehand with the customization API), so an agent's ``asr_hotwords`` are not sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from asr_svc.engine import Transcript
from asr_svc.providers import SAMPLE_RATE, AsrRequest, EngineError, StreamingEngine, register
from shared.settings import AsrSettings

log = logging.getLogger("asr_svc.remote.aliyun")

# Languages whose sentences are joined without a space.
_NO_SPACE = ("zh", "ja", "ko", "yue")


def new_task_id() -> str:
    """A task id as the SDK makes them: a UUID's 32 hex digits."""
    return uuid.uuid4().hex


def language_hint(language: str | None) -> str | None:
    """``zh-CN`` -> ``zh``: the documented hints are bare codes (zh, en, ja, yue, ko, ...)."""
    if not language:
        return None
    return language.replace("_", "-").split("-")[0].lower() or None


def run_task(task_id: str, model: str, *, language: str | None = None, vocabulary_id: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """The ``run-task`` instruction for 16 kHz mono PCM."""
    parameters: dict[str, Any] = {"format": "pcm", "sample_rate": SAMPLE_RATE}
    hint = language_hint(language)
    if hint:
        parameters["language_hints"] = [hint]
    if vocabulary_id:
        parameters["vocabulary_id"] = vocabulary_id
    for key, value in (extra or {}).items():
        parameters.setdefault(key, value)
    return json.dumps(
        {
            "header": {"action": "run-task", "task_id": task_id, "streaming": "duplex"},
            "payload": {"task_group": "audio", "task": "asr", "function": "recognition", "model": model, "parameters": parameters, "input": {}},
        },
        ensure_ascii=False,
    )


def finish_task(task_id: str) -> str:
    """The ``finish-task`` instruction: no more audio."""
    return json.dumps({"header": {"action": "finish-task", "task_id": task_id, "streaming": "duplex"}, "payload": {"input": {}}})


@dataclass
class Event:
    """One server event, decoded."""

    name: str  # task-started, result-generated, task-finished, task-failed
    task_id: str | None = None
    text: str = ""
    sentence_end: bool = False
    heartbeat: bool = False
    error_code: str | None = None
    error_message: str | None = None


EVENTS = ("task-started", "result-generated", "task-finished", "task-failed")


def parse_event(frame: str | bytes) -> Event:
    """A server frame as an :class:`Event`; :class:`EngineError` ``protocol`` for anything the
    protocol does not send (binary frames, non-JSON, an unknown event)."""
    if isinstance(frame, (bytes, bytearray)):
        raise EngineError("protocol", f"binary frame from the server: {bytes(frame[:40])!r}")
    try:
        message = json.loads(frame)
        header = message["header"]
        name = header["event"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineError("protocol", f"not a DashScope event: {frame[:200]!r}") from exc
    if name not in EVENTS:
        raise EngineError("protocol", f"unknown DashScope event {name!r}")
    event = Event(name=name, task_id=header.get("task_id"))
    if name == "task-failed":
        event.error_code = str(header.get("error_code") or "")
        event.error_message = str(header.get("error_message") or "")
    elif name == "result-generated":
        try:
            sentence = (message.get("payload") or {}).get("output", {}).get("sentence") or {}
            event.text = str(sentence.get("text") or "")
            event.sentence_end = bool(sentence.get("sentence_end"))
            event.heartbeat = bool(sentence.get("heartbeat"))
        except AttributeError as exc:
            raise EngineError("protocol", f"result-generated without a sentence: {frame[:200]!r}") from exc
    return event


def failure_reason(code: str | None) -> str:
    """The engine-error reason for a ``task-failed`` ``error_code`` (Model Studio error codes)."""
    code = code or ""
    if code in ("InvalidApiKey", "AccessDenied", "Unauthorized") or code.startswith("AccessDenied"):
        return "auth"
    if code == "Throttling.RateQuota" or code == "Throttling":
        return "rate_limited"
    if code.startswith("Throttling") or code in ("Arrearage", "insufficient_quota", "DataInspectionFailed.Quota"):
        return "quota"
    if code in ("InvalidParameter", "InvalidAudio", "UnsupportedAudioFormat") or "audio" in code.lower():
        return "bad_audio"
    if code in ("InternalError", "InternalServerError", "ServiceUnavailable", "SystemError") or code.startswith("Internal"):
        return "server"
    if code == "ModelNotFound":
        return "protocol"
    return "server"


def failure(event: Event) -> EngineError:
    return EngineError(failure_reason(event.error_code), f"task-failed {event.error_code}: {event.error_message}"[:300])


def handshake_failure(status: int, body: bytes) -> EngineError:
    """The engine error for a refused WebSocket handshake (401/403: the key)."""
    detail = body[:300].decode("utf-8", "replace")
    code = None
    try:
        answer = json.loads(body)
        code = answer.get("code")
        detail = str(answer.get("message") or detail)[:300]
    except (ValueError, AttributeError):
        pass
    if status in (401, 403):
        reason = "auth"
    elif status == 429:
        reason = failure_reason(code) if code and code.startswith("Throttling") else "rate_limited"
    elif status >= 500:
        reason = "server"
    else:
        reason = "protocol"
    return EngineError(reason, f"HTTP {status} {code or ''}: {detail}".replace("  ", " ").strip())


class AliyunStream:
    """One utterance: one task on one connection."""

    def __init__(self, engine: "AliyunAsrEngine", ws: ClientConnection, task_id: str, language: str | None, on_partial: Callable[[str], Awaitable[None]] | None) -> None:
        self.engine = engine
        self.ws = ws
        self.task_id = task_id
        self.language = language
        self.on_partial = on_partial
        self.finals: list[str] = []
        self.partials = 0
        self.samples = 0
        self.error: EngineError | None = None
        self.finished = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read(), name=f"aliyun-{task_id[:8]}")

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                event = parse_event(frame)
                if event.name == "task-failed":
                    raise failure(event)
                if event.name == "task-finished":
                    break
                if event.name != "result-generated" or event.heartbeat:
                    continue
                if event.sentence_end:
                    if event.text:
                        self.finals.append(event.text)
                elif event.text:
                    self.partials += 1
                    if self.on_partial is not None:
                        await self.on_partial(event.text)
            else:
                close = self.ws.close_code
                raise EngineError("unavailable", f"connection closed before task-finished (close code {close})")
        except ConnectionClosed as exc:
            self.error = EngineError("unavailable", f"connection closed before task-finished: {exc}")
        except EngineError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - a broken frame is the server's fault, not ours
            self.error = EngineError("protocol", f"{type(exc).__name__}: {exc}"[:300])
        if not self.finished.done():
            if self.error is not None:
                self.finished.set_exception(self.error)
            else:
                self.finished.set_result(None)
        if self.error is not None:
            self._drop()

    def _drop(self) -> None:
        """Close the connection now, without the closing handshake (a server that stopped
        reading must not hold the caller for ``close_timeout``)."""
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def _diagnosis(self) -> None:
        """The connection closed under a send: the reader has the frames that came before (a
        task-failed says why); let it read them, then raise what it found."""
        await asyncio.wait({self.reader}, timeout=2)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    async def send(self, pcm: np.ndarray) -> None:
        self._raise_if_failed()
        data = np.asarray(pcm, dtype="<i2").tobytes()
        if not data:
            return
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            await self._diagnosis()
            raise EngineError("unavailable", f"connection closed while sending audio: {exc}") from exc
        self.samples += len(pcm)

    async def finish(self) -> Transcript:
        self._raise_if_failed()
        try:
            await self.ws.send(finish_task(self.task_id))
        except ConnectionClosed as exc:
            await self._diagnosis()
            raise EngineError("unavailable", f"connection closed before finish-task: {exc}") from exc
        try:
            await asyncio.shield(self.finished)
        except BaseException:
            self._drop()
            raise
        await self.ws.close()
        joiner = "" if (self.language or "") in _NO_SPACE else " "
        text = joiner.join(part.strip() for part in self.finals).strip()
        log.info("aliyun task finished", extra={"fields": {"engine": self.engine.name, "task_id": self.task_id, "partials": self.partials, "sentences": len(self.finals)}})
        return Transcript(text=text, language=self.language, audio_s=self.samples / SAMPLE_RATE)

    async def cancel(self) -> None:
        if self.error is None:
            self.error = EngineError("unavailable", "stream cancelled")
        self.reader.cancel()
        self._drop()
        if not self.finished.done():
            self.finished.cancel()
        elif not self.finished.cancelled():
            self.finished.exception()  # retrieved: no "never retrieved" warning


class AliyunAsrEngine(StreamingEngine):
    type = "aliyun"
    chunk_ms = 100  # the docs suggest ~100 ms packets

    def __init__(self, name: str, cfg: Any, asr: AsrSettings) -> None:
        self.name = name
        self.cfg = cfg
        self.timeout_s = cfg.timeout_s
        self._hotwords_noted = False

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": "xiaozhi-nats"}
        key = self.cfg.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if self.cfg.workspace:
            headers["X-DashScope-WorkSpace"] = self.cfg.workspace
        if self.cfg.data_inspection:
            headers["X-DashScope-DataInspection"] = "enable"
        return headers

    async def open_stream(self, request: AsrRequest, on_partial: Callable[[str], Awaitable[None]] | None = None) -> AliyunStream:
        if request.hotwords and not self._hotwords_noted:
            self._hotwords_noted = True
            log.debug("DashScope realtime ASR takes no per-request hotwords: the agent's are not sent (set vocabulary_id)", extra={"fields": {"engine": self.name}})
        language = language_hint(self.cfg.language or request.language)
        try:
            ws = await connect(self.cfg.url, additional_headers=self._headers(), open_timeout=self.timeout_s, close_timeout=2, max_size=2**22)
        except InvalidStatus as exc:
            raise handshake_failure(exc.response.status_code, exc.response.body or b"") from exc
        except InvalidURI as exc:
            raise EngineError("unavailable", f"bad url {self.cfg.url!r}: {exc}") from exc
        except InvalidHandshake as exc:
            raise EngineError("protocol", f"{self.cfg.url}: WebSocket handshake failed: {exc}") from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise EngineError("unavailable", f"{self.cfg.url}: {exc or type(exc).__name__}") from exc
        task_id = new_task_id()
        try:
            await ws.send(run_task(task_id, self.cfg.model, language=language, vocabulary_id=self.cfg.vocabulary_id, extra=self.cfg.parameters))
            while True:
                event = parse_event(await ws.recv())
                if event.name == "task-started":
                    break
                if event.name == "task-failed":
                    raise failure(event)
                raise EngineError("protocol", f"{event.name} before task-started")
        except ConnectionClosed as exc:
            raise EngineError("unavailable", f"connection closed before task-started: {exc}") from exc
        except BaseException:
            ws.transport.abort()
            raise
        return AliyunStream(self, ws, task_id, language, on_partial)


register("aliyun", AliyunAsrEngine)
