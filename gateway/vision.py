"""The vision endpoint (protocol.md §8): the device's camera tool posts a photo and a question.

The request is multipart (``question`` then ``file``), often chunked, with the vision token
from MCP ``initialize``. The answer comes from a configurable OpenAI-compatible vision model and
goes back as ``{"success": true, "action": "RESPONSE", "response": ...}``, which the LLM stage
speaks directly. Errors are JSON too: 401 for a bad token, 200 with ``success: false`` otherwise
(as the reference server answers, so the device passes the message on instead of failing).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway import auth
from gateway import metrics as m
from gateway.ota import CORS_HEADERS
from shared.settings import GatewaySettings

log = logging.getLogger("gateway.vision")

_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def image_type(data: bytes) -> str | None:
    """The image's MIME type from its magic bytes, or None when it is no supported image."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return None


def _error(message: str, status: int = 200) -> web.Response:
    m.VISION_REQUESTS.labels("error" if status == 200 else str(status)).inc()
    return web.json_response({"success": False, "message": message}, status=status, headers=CORS_HEADERS)


def add_routes(
    app: web.Application, settings: GatewaySettings, auth_key: str,
    session_open: Callable[[str, str], Awaitable[bool]] | None = None,
) -> None:
    """``session_open(device_id, session_id)``: whether that session is open on some gateway. A
    session's token (v2) is good for as long as it is and refused after; without the check
    (None) tokens last ``auth.vision_ttl_seconds``."""
    vision = settings.vision
    limit = vision.max_image_bytes

    async def options(_request: web.Request) -> web.Response:
        return web.Response(headers=CORS_HEADERS)

    async def status(_request: web.Request) -> web.Response:
        state = f"model {vision.model} at {vision.base_url}" if vision.base_url else "no vision model configured"
        return web.Response(text=f"Vision endpoint is running: {state}\n", headers=CORS_HEADERS)

    async def explain(request: web.Request) -> web.Response:
        device_id = request.headers.get("Device-Id", "").strip()
        if not device_id:
            return _error("Device-Id header is required", 401)
        checked = auth.verify_vision(auth_key, request.headers.get("Authorization", ""), device_id, int(time.time()), session_bound=session_open is not None)
        if checked.ok and checked.session_id is not None and session_open is not None and not await session_open(device_id, checked.session_id):
            checked = auth.AuthResult(False, "its session has ended")
        if not checked.ok:
            log.info("vision token rejected", extra={"fields": {"device_id": device_id, "reason": checked.reason}})
            return _error(f"invalid vision token: {checked.reason}", 401)
        if not request.content_type.startswith("multipart/"):
            return _error("expected multipart/form-data with a question and an image")
        question, image = "", b""
        try:
            reader = await request.multipart()
            async for part in reader:
                if part.name == "question":
                    question = (await part.read(decode=True)).decode("utf-8", "replace")[:2000]
                elif part.name in ("file", "image") or part.filename:
                    chunks = []
                    size = 0
                    while True:
                        chunk = await part.read_chunk(65536)
                        if not chunk:
                            break
                        size += len(chunk)
                        if size > limit:
                            return _error(f"image larger than {limit // (1024 * 1024)} MiB")
                        chunks.append(chunk)
                    image = b"".join(chunks)
        except (ValueError, aiohttp.ClientError, web.HTTPException) as exc:
            return _error(f"malformed multipart body: {type(exc).__name__}")
        if not image:
            return _error("no image in the request")
        mime = image_type(image)
        if mime is None:
            return _error("unsupported image format (JPEG, PNG, GIF, BMP, TIFF or WEBP)")
        if not vision.base_url:
            return _error("no vision model is configured on this server")
        try:
            answer = await ask_model(vision, question or "What is in this picture?", image, mime)
        except Exception as exc:  # noqa: BLE001 - the model's failure is the device's error text
            log.warning("vision model failed: %s", exc)
            return _error(f"vision model failed: {exc}"[:300])
        m.VISION_REQUESTS.labels("ok").inc()
        log.info("vision answered", extra={"fields": {"device_id": device_id, "question": question[:100], "bytes": len(image)}})
        return web.json_response({"success": True, "action": "RESPONSE", "response": answer}, headers=CORS_HEADERS)

    app.router.add_post("/mcp/vision/explain", explain)
    app.router.add_get("/mcp/vision/explain", status)
    app.router.add_route("OPTIONS", "/mcp/vision/explain", options)


async def ask_model(vision: Any, question: str, image: bytes, mime: str) -> str:
    """One OpenAI-compatible chat completion with the image as a data URL."""
    body = {
        "model": vision.model,
        "max_tokens": vision.max_tokens,
        "messages": [
            {"role": "system", "content": vision.prompt},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(image).decode()}"}},
                ],
            },
        ],
    }
    headers = {"Authorization": f"Bearer {vision.api_key}"}
    timeout = aiohttp.ClientTimeout(total=vision.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(vision.base_url.rstrip("/") + "/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
            data = await response.json(content_type=None)
    content = data["choices"][0]["message"]["content"]
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content).strip()
