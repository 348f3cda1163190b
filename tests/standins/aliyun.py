"""A stand-in for DashScope's realtime speech recognition WebSocket (Paraformer / Fun-ASR realtime).

As documented by Alibaba Cloud Model Studio:
- "WebSocket API" (help.aliyun.com/zh/model-studio/websocket-for-paraformer-real-time-service):
  ``/api-ws/v1/inference``, ``Authorization: Bearer <key>`` verified at the handshake ("if the API
  key is invalid or missing, the handshake fails with an HTTP 401 or 403 error"), optional
  ``X-DashScope-WorkSpace`` / ``X-DashScope-DataInspection``; the flow run-task -> task-started ->
  binary audio + result-generated -> finish-task -> last result-generated -> task-finished;
- client events (alibabacloud.com/help/en/model-studio/paraformer-client-events,
  help.aliyun.com/en/model-studio/fun-asr-client-events): the run-task and finish-task fields;
- server events (alibabacloud.com/help/en/model-studio/paraformer-server-events): task-started
  ``{"header": {"task_id", "event", "attributes": {}}, "payload": {}}``, result-generated with
  ``payload.output.sentence`` {begin_time, end_time (null until the sentence ends), text,
  heartbeat, sentence_end, words} and ``payload.usage`` (null on intermediate results),
  task-finished, task-failed with ``header.error_code`` / ``header.error_message`` (the
  connection is then closed);
- error codes (help.aliyun.com/en/model-studio/error-code): 401 ``InvalidApiKey`` "Invalid
  API-key provided.", 429 ``Throttling.AllocationQuota`` "Allocated quota exceeded, please
  increase your quota limit.", ``Throttling.RateQuota`` "Requests rate limit exceeded, please
  try again later.", 400 ``InvalidParameter``;
- the official SDK, dashscope/dashscope-sdk-python ``dashscope/audio/asr/recognition.py``
  (skips heartbeat sentences, task ids are ``uuid4().hex``).

What the stand-in does: the key ``sk-aliyun-good`` is the only one accepted (any other: the
handshake is refused with HTTP 401 and the platform's error body). It checks the run-task
instruction field by field (task-failed ``InvalidParameter`` otherwise), transcribes the audio it
got with the packaged Whisper (``language_hints[0]`` honoured) and, while audio comes, sends an
intermediate result (sentence_end false) for each further second of audio. Models select the
other behaviours: ``quota`` (task-failed Throttling.AllocationQuota at run-task), ``ratelimit``
(Throttling.RateQuota), ``bad-audio`` (task-failed InvalidParameter once audio comes: the code
is the documented one, the message the stand-in's own), ``slow`` (never answers finish-task: reads on until the client leaves),
``dies`` (drops the TCP connection after the first audio), ``garbage`` (answers the audio with
binary noise and an HTML page).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import numpy as np
from aiohttp import WSMsgType, web

from tests.standins import whisper_text

GOOD_KEY = "sk-aliyun-good"
WS = web.RequestKey("ws", web.WebSocketResponse)
PATH = "/api-ws/v1/inference"
MODELS = ("paraformer-realtime-v2", "paraformer-realtime-8k-v2", "fun-asr-realtime", "quota", "ratelimit", "bad-audio", "slow", "dies", "garbage")


def _event(task_id: str, name: str, payload: dict | None = None, **header: object) -> str:
    return json.dumps({"header": {"task_id": task_id, "event": name, **header, "attributes": {}}, "payload": payload if payload is not None else {}}, ensure_ascii=False)


def failed(task_id: str, code: str, message: str) -> str:
    return _event(task_id, "task-failed", error_code=code, error_message=message)


def result(task_id: str, text: str, end_ms: int | None, final: bool, audio_s: float) -> str:
    sentence = {"begin_time": 0, "end_time": end_ms if final else None, "text": text, "heartbeat": False, "sentence_end": final, "words": []}
    return _event(task_id, "result-generated", {"output": {"sentence": sentence}, "usage": {"duration": max(1, round(audio_s))} if final else None})


def check_run_task(message: dict) -> str | None:
    """What is wrong with a run-task instruction, as documented; None: nothing."""
    header, payload = message.get("header") or {}, message.get("payload") or {}
    if header.get("action") != "run-task":
        return f"header.action must be run-task, got {header.get('action')!r}"
    if not isinstance(header.get("task_id"), str) or len(header["task_id"].replace("-", "")) != 32:
        return "header.task_id must be a UUID"
    if header.get("streaming") != "duplex":
        return "header.streaming must be duplex"
    for key, want in (("task_group", "audio"), ("task", "asr"), ("function", "recognition")):
        if payload.get(key) != want:
            return f"payload.{key} must be {want}"
    if payload.get("input") != {}:
        return "payload.input must be {}"
    if payload.get("model") not in MODELS:
        return f"Model not found ({payload.get('model')})"
    parameters = payload.get("parameters") or {}
    if parameters.get("format") != "pcm" or parameters.get("sample_rate") != 16000:
        return "parameters.format/sample_rate: this stand-in takes pcm at 16000 Hz"
    hints = parameters.get("language_hints")
    if hints is not None and not (isinstance(hints, list) and all(isinstance(h, str) for h in hints)):
        return "parameters.language_hints must be an array of strings"
    return None


def make_app(seen: list[dict] | None = None) -> web.Application:
    """``seen`` gets, per task, the handshake headers (no key), the run-task parameters, and the
    partial results sent."""

    async def inference(request: web.Request) -> web.StreamResponse:
        try:
            return await _inference(request)
        except ConnectionResetError:  # the client dropped the connection: nothing to answer
            return request[WS]

    async def _inference(request: web.Request) -> web.StreamResponse:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key.strip() != GOOD_KEY:
            return web.json_response({"code": "InvalidApiKey", "message": "Invalid API-key provided.", "request_id": str(uuid.uuid4())}, status=401)
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        request[WS] = ws
        await ws.prepare(request)
        record: dict = {"headers": {k: v for k, v in request.headers.items() if k.lower() != "authorization"}, "partials": [], "final": None}
        if seen is not None:
            seen.append(record)
        first = await ws.receive()
        if first.type != WSMsgType.TEXT:
            await ws.close()
            return ws
        try:
            message = json.loads(first.data)
        except ValueError:
            message = {}
        task_id = str((message.get("header") or {}).get("task_id") or "")
        problem = check_run_task(message)
        if problem:
            await ws.send_str(failed(task_id, "InvalidParameter", problem))
            await ws.close()
            return ws
        payload = message["payload"]
        model, parameters = payload["model"], payload["parameters"]
        record["parameters"] = parameters
        record["model"] = model
        if model == "quota":
            await ws.send_str(failed(task_id, "Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit."))
            await ws.close()
            return ws
        if model == "ratelimit":
            await ws.send_str(failed(task_id, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later."))
            await ws.close()
            return ws
        await ws.send_str(_event(task_id, "task-started"))
        language = (parameters.get("language_hints") or [None])[0]
        loop = asyncio.get_running_loop()
        audio = bytearray()
        next_partial = 16000 * 2  # bytes: one second of s16le
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                audio.extend(msg.data)
                if model == "bad-audio":
                    await ws.send_str(failed(task_id, "InvalidParameter", "The audio could not be decoded as pcm at 16000 Hz."))
                    await ws.close()
                    return ws
                if model == "dies":
                    assert request.transport is not None
                    request.transport.close()
                    return ws
                if model == "garbage":
                    await ws.send_bytes(os.urandom(64))
                    await ws.send_str("<html><body>502 Bad Gateway</body></html>")
                    continue
                if len(audio) >= next_partial and model != "slow":
                    next_partial += 16000 * 2
                    pcm = np.frombuffer(bytes(audio[: len(audio) // 2 * 2]), dtype="<i2")
                    text = await loop.run_in_executor(None, whisper_text, pcm, language)
                    if text:
                        record["partials"].append(text)
                        await ws.send_str(result(task_id, text, None, False, len(pcm) / 16000))
            elif msg.type == WSMsgType.TEXT:
                try:
                    instruction = json.loads(msg.data)
                except ValueError:
                    instruction = {}
                header = instruction.get("header") or {}
                if header.get("action") != "finish-task" or header.get("task_id") != task_id:
                    await ws.send_str(failed(task_id, "InvalidParameter", f"unexpected instruction {msg.data[:100]}"))
                    await ws.close()
                    return ws
                if model == "slow":
                    continue  # never answers: reads on until the client gives up
                if len(audio) % 2:
                    await ws.send_str(failed(task_id, "InvalidParameter", "pcm audio must be whole 16-bit samples"))
                    await ws.close()
                    return ws
                pcm = np.frombuffer(bytes(audio), dtype="<i2")
                text = await loop.run_in_executor(None, whisper_text, pcm, language) if len(pcm) else ""
                record["final"] = text
                if text:
                    await ws.send_str(result(task_id, text, round(len(pcm) / 16), True, len(pcm) / 16000))
                await ws.send_str(_event(task_id, "task-finished", {"output": {}}))
                await ws.close()
                return ws
        return ws

    app = web.Application()
    app.router.add_get(PATH, inference)
    return app
