"""A stand-in for OpenAI's ``POST /v1/audio/transcriptions`` (and the servers that copy it).

Per the API reference (platform.openai.com/docs/api-reference/audio/createTranscription): a
multipart form with ``file``, ``model``, optional ``language``, ``prompt`` and
``response_format`` (``json``: ``{"text": ...}``), authorised by ``Authorization: Bearer``.
Errors are the API's envelope ``{"error": {"message", "type", "param", "code"}}``: 401
``invalid_api_key`` for a wrong key, 429 ``insufficient_quota``, 400 for a file it cannot read
(messages as the API words them, platform.openai.com/docs/guides/error-codes).

What the models do here: ``whisper-1`` transcribes with the packaged Whisper (``language``
honoured); ``slow`` answers after 30 s; ``quota`` answers 429; ``garbage`` answers 200 with an
HTML page. The key ``sk-test-good`` is the only one accepted.
"""

from __future__ import annotations

import asyncio
import io
import wave

import numpy as np
from aiohttp import web

from tests.standins import whisper_text

GOOD_KEY = "sk-test-good"


def _error(status: int, message: str, type_: str, code: str | None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": code}}, status=status)


def make_app(seen: list[dict] | None = None) -> web.Application:
    async def transcriptions(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ").strip()
        if key != GOOD_KEY:
            shown = f"{key[:6]}{'*' * 4}{key[-4:]}" if len(key) > 10 else key
            return _error(401, f"Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key")
        form = await request.post()
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if k != "file"}
        if seen is not None:
            seen.append(fields)
        model = fields.get("model")
        if model == "quota":
            return _error(429, "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.", "insufficient_quota", "insufficient_quota")
        if model == "garbage":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if model == "slow":
            await asyncio.sleep(30)
        try:
            with wave.open(io.BytesIO(upload.file.read())) as wav:  # type: ignore[union-attr]
                assert wav.getframerate() == 16000 and wav.getnchannels() == 1 and wav.getsampwidth() == 2
                pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        except Exception:  # noqa: BLE001 - anything but a readable WAV
            return _error(400, "Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', 'wav', 'webm']", "invalid_request_error", None)
        text = await asyncio.get_running_loop().run_in_executor(None, whisper_text, pcm, fields.get("language") or None)
        return web.json_response({"text": text})

    app = web.Application(client_max_size=25 * 1024 * 1024)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    return app
