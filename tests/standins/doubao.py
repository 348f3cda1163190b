"""A stand-in for Volcengine's big-model streaming ASR (``/api/v3/sauc/bigmodel``,
``/bigmodel_async``, ``/bigmodel_nostream``).

Sources: the vendor's "大模型流式语音识别API" (https://www.volcengine.com/docs/6561/1354869; a
copy of its markdown is in github yizhisec/fcitx5-anytalk ``doubao语音-api.md``) for the
handshake headers, the 4-byte header, the frame layouts, the request fields, the response
``result {text, utterances [{text, definite}]}`` and the error codes; the vendor's Python demo
``sauc_websocket_demo.py`` (from the doc's sauc_python.zip; a copy in github
1shadow1/spark_asr) for the sequence numbering (full client request = 1, audio 2, 3, ..., the
last flagged 0b0011 with its sequence negated). The handshake refusal (HTTP 401 with
``{"code": 45000010, "message": "load grant: requested grant not found in SaaS storage"}``) and
the quota frame (45000292 ``quota exceeded for types: concurrency``) are as users of the API
report them in public code and notes, not in the doc.

What it does: checks the handshake headers (a wrong access key: 401, never upgraded), answers
``X-Tt-Logid``; checks the first frame is a full client request with the documented audio
fields (else 45000001 / 45000151); answers every packet with a full server response (on
``bigmodel``/``bigmodel_async`` with the partial text of the audio so far, every
``PARTIAL_EVERY`` packets, as an utterance with ``definite: false``); at the last packet
transcribes all the audio with the packaged Whisper (``audio.language`` honoured, only sent to
``bigmodel_nostream``; otherwise English) and answers the final response, flagged last.

Behaviours, chosen by the app key (``X-Api-App-Key``): ``quota`` answers the quota error frame
after the first audio packet; ``badaudio`` the malformed-audio frame (45000151); ``slow``
never answers the last packet; ``die`` closes the socket mid-utterance; ``garbage`` answers
bytes of no frame. Any other app key behaves. The access key ``doubao-test-token`` is the
only one accepted.
"""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
from aiohttp import WSMsgType, web

from asr_svc.remote.doubao import (
    AUDIO_ONLY_REQUEST,
    FULL_CLIENT_REQUEST,
    ProtocolError,
    decode_frame,
    error_frame,
    server_response,
)
from tests.standins import whisper_text

GOOD_TOKEN = "doubao-test-token"
RESOURCES = ("volc.bigasr.sauc.duration", "volc.bigasr.sauc.concurrent", "volc.seedasr.sauc.duration", "volc.seedasr.sauc.concurrent")
PARTIAL_EVERY = 4  # packets (200 ms each) between partial transcriptions
LANGS = {"en-US": "en", "zh-CN": "zh"}


def _logid() -> str:
    return "2026" + secrets.token_hex(13).upper()


def _result(text: str, definite: bool, duration_ms: int) -> dict:
    utterances = [{"text": text, "definite": definite, "start_time": 0, "end_time": duration_ms}] if text else []
    return {"audio_info": {"duration": duration_ms}, "result": {"text": text, "utterances": utterances}}


def make_app(seen: list[dict] | None = None) -> web.Application:
    """``seen`` gets, per connection: the handshake headers (the access key masked), the
    request JSON, the packet flags and sequences, and what the stand-in sent."""

    async def sauc(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        logid = _logid()
        record: dict = {"mode": mode, "headers": {k: request.headers.get(k, "") for k in ("X-Api-App-Key", "X-Api-Resource-Id", "X-Api-Connect-Id")}, "packets": [], "partials": [], "final": None, "error": None}
        if seen is not None:
            seen.append(record)
        token = request.headers.get("X-Api-Access-Key", "")
        record["token_ok"] = token == GOOD_TOKEN
        if not request.headers.get("X-Api-App-Key") or token != GOOD_TOKEN:
            return web.json_response({"code": 45000010, "message": "load grant: requested grant not found in SaaS storage"}, status=401, headers={"X-Tt-Logid": logid, "X-Api-Status-Code": "45000010", "X-Api-Message": "load grant: requested grant not found in SaaS storage"})
        if request.headers.get("X-Api-Resource-Id") not in RESOURCES:
            message = f"[resource_id={request.headers.get('X-Api-Resource-Id', '')}] requested resource not granted"
            return web.json_response({"code": 45000030, "message": message}, status=403, headers={"X-Tt-Logid": logid})
        behaviour = request.headers["X-Api-App-Key"]
        ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
        ws.headers["X-Tt-Logid"] = logid
        ws.headers["X-Api-Connect-Id"] = request.headers.get("X-Api-Connect-Id", "")
        await ws.prepare(request)
        loop = asyncio.get_running_loop()

        async def fail(code: int, message: str) -> web.WebSocketResponse:
            record["error"] = code
            await ws.send_bytes(error_frame(code, message))
            await ws.close()
            return ws

        params = None
        audio = bytearray()
        language = None
        packets = 0
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                return await fail(45000001, "请求参数无效: binary frames only")
            try:
                frame = decode_frame(msg.data)
            except ProtocolError as exc:
                return await fail(45000001, f"请求参数无效: {exc}")
            record["packets"].append((frame.message_type, frame.flags, frame.sequence))
            if params is None:
                if frame.message_type != FULL_CLIENT_REQUEST or not isinstance(frame.payload, dict):
                    return await fail(45000001, "请求参数无效: the first message must be the full client request")
                params = record["request"] = frame.payload
                req, aud = params.get("request") or {}, params.get("audio") or {}
                if req.get("model_name") != "bigmodel":
                    return await fail(45000001, "请求参数无效: request.model_name")
                if aud.get("format") != "pcm" or aud.get("codec", "raw") != "raw" or aud.get("rate", 16000) != 16000 or aud.get("bits", 16) != 16 or aud.get("channel", 1) != 1:
                    return await fail(45000151, "音频格式不正确")
                language = LANGS.get(aud.get("language") or "", aud.get("language")) if mode == "bigmodel_nostream" else None
                await ws.send_bytes(server_response(_result("", False, 0), frame.sequence or 1))
                continue
            if frame.message_type != AUDIO_ONLY_REQUEST:
                return await fail(45000001, "请求参数无效: expected an audio-only request")
            packets += 1
            audio += frame.payload
            if behaviour == "quota":
                return await fail(45000292, "quota exceeded for types: concurrency")
            if behaviour == "badaudio":
                return await fail(45000151, "音频格式不正确")
            if behaviour == "garbage":
                await ws.send_bytes(b"<html><body>502 Bad Gateway</body></html>")
                await asyncio.sleep(5)
                return ws
            if behaviour == "die" and packets == 3:
                record["error"] = "died"
                request.transport.close()  # no close frame: the socket just goes
                return ws
            duration = len(audio) // 32
            sequence = frame.sequence if frame.sequence is not None else packets + 1
            if frame.last:
                if behaviour == "slow":
                    await asyncio.sleep(30)
                    return ws
                pcm = np.frombuffer(bytes(audio[: len(audio) // 2 * 2]), dtype="<i2")
                if not len(pcm):
                    return await fail(45000002, "空音频")
                text = await loop.run_in_executor(None, whisper_text, pcm, language)
                record["final"] = text
                await ws.send_bytes(server_response(_result(text, True, duration), sequence, last=True))
                await ws.close()
                return ws
            text = ""
            if mode != "bigmodel_nostream" and packets % PARTIAL_EVERY == 0:
                pcm = np.frombuffer(bytes(audio[: len(audio) // 2 * 2]), dtype="<i2")
                text = await loop.run_in_executor(None, whisper_text, pcm, None)
                if text:
                    record["partials"].append(text)
            if mode == "bigmodel_async" and not text:
                continue  # the optimised mode answers only when the text changes
            await ws.send_bytes(server_response(_result(text or (record["partials"] or [""])[-1], False, duration), sequence))
        if params is not None and record["final"] is None:
            record["error"] = record["error"] or 45000081  # 等包超时: the client never sent the last packet
        return ws

    app = web.Application()
    app.router.add_get("/api/v3/sauc/{mode:bigmodel|bigmodel_async|bigmodel_nostream}", sauc)
    return app
