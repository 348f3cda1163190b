"""A stand-in for the FunASR runtime server (funasr-wss-server / funasr-wss-server-2pass).

The protocol as modelscope/FunASR documents it, runtime/docs/websocket_protocol.md, and as its
servers implement it, runtime/websocket/bin/websocket-server.cpp (offline) and
websocket-server-2pass.cpp (online, 2pass); the reference client is
runtime/python/websocket/funasr_wss_client.py:

- a WebSocket with the subprotocol ``binary``; the first message is JSON text (``mode``,
  ``chunk_size``, ``chunk_interval``, ``audio_fs``, ``wav_name``, ``wav_format``, ``is_speaking``,
  ``hotwords`` as a JSON string of ``{word: weight}``, ``itn``, ``svs_lang``), then PCM as binary
  frames, then ``{"is_speaking": false}``;
- ``offline``: one answer after the end of audio, ``{"text", "mode": "offline", "is_final":
  false, "wav_name"}`` (``is_final`` is false in the C++ server's offline answer, as here);
- ``2pass`` / ``online``: while audio comes, ``{"text", "mode": "2pass-online" | "online",
  "slice_type", "index", "timestamp", "wav_name", "is_final": false}`` with the new text of each
  stretch of audio; after the end of audio the ``is_final: true`` message, ``mode:
  "2pass-offline"`` with the corrected text of the sentence (and ``start_time``, ``end_time``);
- a ``wav_format`` other than pcm in 2pass/online mode: ``{"text": "ERROR. Real-time
  transcription service ONLY SUPPORT PCM stream.", "wav_name", "is_final": true}``.

Here the stand-in serves plain ``ws://`` (the real server's default is ``wss://`` with a
self-signed certificate). Text comes from the packaged Whisper (``svs_lang`` honoured); an
online partial is Whisper's text of each new 0.6 s of audio. FunASR has no keys and no quota.

What the URL path asks of the stand-in (the real server ignores the path):
``/`` answers as above; ``/slow`` takes everything and never answers; ``/die`` drops the TCP
connection after the first 0.2 s of audio; ``/garbage`` answers the audio with a non-JSON text
frame; ``/empty`` answers the final with ``"text": ""``; ``/notext`` answers it without ``text``.
Each connection's start message, path and the partials sent are appended to ``seen``.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
from aiohttp import WSMsgType, web

from tests.standins import whisper_text

PARTIAL_BYTES = 16000 * 2 * 6 // 10  # 0.6 s of 16 kHz int16: chunk_size [5, 10, 5] is 600 ms
PCM_ONLY = "ERROR. Real-time transcription service ONLY SUPPORT PCM stream."


def make_app(seen: list[dict] | None = None) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        behaviour = request.match_info.get("behaviour", "").strip("/")
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        record: dict = {"path": "/" + behaviour, "protocol": ws.ws_protocol, "start": None, "partials": [], "end": None}
        if seen is not None:
            seen.append(record)
        loop = asyncio.get_running_loop()
        audio = bytearray()
        sent_to = 0  # bytes of audio the partials have covered
        index = 0
        config: dict = {}

        async def hear(pcm: bytes) -> str:
            language = config.get("svs_lang")
            language = None if language in (None, "", "auto") else language
            return await loop.run_in_executor(None, whisper_text, np.frombuffer(bytes(pcm), dtype="<i2"), language)

        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    continue  # the C++ server logs and ignores a message it cannot parse
                if record["start"] is None:
                    record["start"] = message
                    config.update(message)
                elif "is_speaking" in message:
                    record["end"] = message
                if message.get("is_speaking", True):
                    continue
                # The end of audio.
                if behaviour == "slow":
                    continue  # never answers; the client gives up
                mode = config.get("mode", "2pass")
                wav_name = config.get("wav_name", "wav-default-id")
                if mode != "offline" and str(config.get("wav_format", "pcm")).lower() != "pcm":
                    await ws.send_str(json.dumps({"text": PCM_ONLY, "wav_name": wav_name, "is_final": True}))
                    continue
                text = await hear(audio) if len(audio) >= 3200 else ""
                if mode == "offline":
                    answer = {"text": text, "mode": "offline", "is_final": False, "wav_name": wav_name}
                elif mode == "online":
                    rest = await hear(audio[sent_to:]) if len(audio) - sent_to >= 3200 else ""
                    answer = {"text": rest, "mode": "online", "slice_type": 2, "index": index, "timestamp": "", "wav_name": wav_name, "is_final": True}
                else:
                    answer = {"text": text, "mode": "2pass-offline", "start_time": 0, "end_time": len(audio) * 1000 // 32000, "slice_type": 2, "index": index, "timestamp": "", "wav_name": wav_name, "is_final": True}
                if behaviour == "empty":
                    answer["text"] = ""
                elif behaviour == "notext":
                    del answer["text"]
                await ws.send_str(json.dumps(answer, ensure_ascii=False))
                audio.clear()
                sent_to = 0
                index += 1
            elif msg.type == WSMsgType.BINARY:
                audio += msg.data
                if behaviour == "die" and len(audio) >= 6400:
                    assert request.transport is not None
                    request.transport.abort()  # the server process gone: no close frame
                    break
                if behaviour == "garbage":
                    await ws.send_str("<html><body><h1>502 Bad Gateway</h1></body></html>")
                    behaviour = "garbage-sent"
                    continue
                mode = config.get("mode", "2pass")
                if mode in ("online", "2pass") and len(audio) - sent_to >= PARTIAL_BYTES:
                    piece = await hear(audio[sent_to:])
                    sent_to = len(audio)
                    if piece:
                        partial_mode = "online" if mode == "online" else "2pass-online"
                        partial = {"text": piece, "mode": partial_mode, "slice_type": 0 if not record["partials"] else 1, "index": index, "timestamp": "", "wav_name": config.get("wav_name", "wav-default-id"), "is_final": False}
                        record["partials"].append(piece)
                        await ws.send_str(json.dumps(partial, ensure_ascii=False))
        return ws

    app = web.Application()
    app.router.add_get("/{behaviour:.*}", handle)
    return app
