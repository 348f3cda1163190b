"""``openai``: an OpenAI-compatible ``POST {base_url}/audio/transcriptions``.

OpenAI, Groq, SiliconFlow (SenseVoice), vLLM's Whisper serving and speaches
(faster-whisper-server) all take the same multipart form: ``file`` (here a 16 kHz mono WAV),
``model``, optional ``language`` (ISO-639-1) and ``prompt``, ``response_format=json``; the
answer is ``{"text": ...}``. Errors come as ``{"error": {"message", "type", "param", "code"}}``
with the HTTP status saying which kind (401 key, 429 rate or quota, 400 the audio).
"""

from __future__ import annotations

import io
import json
import logging
import wave
from typing import Any

import aiohttp
import numpy as np

from asr_svc.engine import Transcript
from asr_svc.providers import AsrRequest, EngineError, register
from shared.settings import AsrSettings

log = logging.getLogger("asr_svc.remote.openai")


def wav_bytes(pcm: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return buf.getvalue()


def _reason(status: int, code: str | None) -> str:
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "quota" if code in ("insufficient_quota", "credit_balance_exhausted") else "rate_limited"
    if status in (400, 413, 415, 422):
        return "bad_audio"
    if status >= 500:
        return "server"
    return "protocol"


class OpenAiAsrEngine:
    type = "openai"
    streaming = False
    multilingual = True

    def __init__(self, name: str, cfg: Any, asr: AsrSettings) -> None:
        self.name = name
        self.cfg = cfg
        self.timeout_s = cfg.timeout_s
        self.url = cfg.base_url.rstrip("/") + "/audio/transcriptions"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    async def transcribe(self, pcm: np.ndarray, request: AsrRequest) -> Transcript:
        form = aiohttp.FormData()
        form.add_field("file", wav_bytes(pcm), filename="utterance.wav", content_type="audio/wav")
        form.add_field("model", self.cfg.model)
        form.add_field("response_format", "json")
        language = self.cfg.language or request.language
        if language:
            form.add_field("language", language.split("-")[0])
        prompt = self.cfg.prompt
        if request.hotwords:
            # Whisper-style servers take no hotword list; the prompt is how they are steered.
            prompt = ", ".join(request.hotwords) + (f". {prompt}" if prompt else "")
        if prompt:
            form.add_field("prompt", prompt)
        headers = {}
        key = self.cfg.key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            async with self._client().post(self.url, data=form, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectionError as exc:
            raise EngineError("unavailable", f"{self.url}: {exc}") from exc
        if status != 200:
            code, message = None, body[:300].decode("utf-8", "replace")
            try:
                error = json.loads(body).get("error") or {}
                if isinstance(error, dict):
                    code = error.get("code") or error.get("type")
                    message = str(error.get("message") or message)[:300]
                elif isinstance(error, str):
                    message = error[:300]
            except (ValueError, AttributeError):
                pass
            raise EngineError(_reason(status, code), f"HTTP {status} {code or ''}: {message}".strip())
        try:
            payload = json.loads(body)
            text = payload["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError("protocol", f"not a transcription answer: {body[:200]!r}") from exc
        return Transcript(text=text.strip(), language=payload.get("language") or language, audio_s=len(pcm) / 16000)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


register("openai", OpenAiAsrEngine)
