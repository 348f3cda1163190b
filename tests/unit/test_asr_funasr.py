"""The funasr engine's protocol (asr_svc/remote/funasr.py): the messages it sends and how it
reads the server's answers, per modelscope/FunASR runtime/docs/websocket_protocol.md and the
servers runtime/websocket/bin/websocket-server.cpp / websocket-server-2pass.cpp; and the
engine over a real socket, plain and TLS with a self-signed certificate (as funasr-wss-server
runs by default), against a small local server."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from asr_svc.providers import AsrRequest, EngineError
from asr_svc.remote.funasr import END_MESSAGE, FunAsrEngine, Results, frame_bytes, hotwords_field, parse_message, start_message
from shared.settings import FunAsrEngineSettings
from xiaozhi.stack import free_port


def test_the_start_message_has_the_documented_fields():
    cfg = FunAsrEngineSettings(mode="2pass", itn=False)
    message = json.loads(start_message(cfg, AsrRequest(language="zh-CN", hotwords=["小智", "Xiaozhi", " "])))
    assert message == {
        "mode": "2pass",
        "chunk_size": [5, 10, 5],
        "chunk_interval": 10,
        "encoder_chunk_look_back": 4,
        "decoder_chunk_look_back": 0,
        "audio_fs": 16000,
        "wav_name": "xiaozhi",
        "wav_format": "pcm",
        "is_speaking": True,
        "hotwords": '{"小智": 20, "Xiaozhi": 20}',
        "itn": False,
        "svs_lang": "zh",
    }
    # hotwords is a *string* holding JSON, as the server parses it
    assert json.loads(message["hotwords"]) == {"小智": 20, "Xiaozhi": 20}


def test_no_hotwords_no_language():
    message = json.loads(start_message(FunAsrEngineSettings(), AsrRequest()))
    assert message["hotwords"] == "" and "svs_lang" not in message and message["mode"] == "offline"
    assert json.loads(start_message(FunAsrEngineSettings(send_language=False), AsrRequest(language="en"))).get("svs_lang") is None
    assert hotwords_field(["a"], 30) == '{"a": 30}'


def test_the_end_of_audio_and_the_frame_size():
    assert json.loads(END_MESSAGE) == {"is_speaking": False}
    # 60 ms * chunk_size[1] / chunk_interval of 16 kHz int16, as the reference client cuts it
    assert frame_bytes(FunAsrEngineSettings()) == 1920
    assert frame_bytes(FunAsrEngineSettings(chunk_size=[0, 8, 4], chunk_interval=4)) == 3840


@pytest.mark.parametrize("data", ["<html>502</html>", "[1, 2]", '"text"', ""])
def test_a_frame_that_is_not_a_json_object_is_a_protocol_error(data):
    with pytest.raises(EngineError) as err:
        parse_message(data)
    assert err.value.reason == "protocol"


def test_the_cpp_offline_answer_is_final_though_is_final_is_false():
    results = Results("offline")
    results.ended = True
    results.take({"text": "现在几点了", "mode": "offline", "is_final": False, "wav_name": "xiaozhi"})
    assert results.final is not None and results.text() == "现在几点了"


def test_the_python_servers_offline_answer():
    results = Results("offline")
    results.ended = True
    results.take({"mode": "offline", "text": "What time is it?", "wav_name": "demo", "is_final": True, "timestamp": "[[100,200]]"})
    assert results.text() == "What time is it?"


def test_2pass_partials_then_corrected_sentences_then_the_final():
    results = Results("2pass")
    assert results.take({"text": "现在", "mode": "2pass-online", "is_final": False, "slice_type": 0}) == "现在"
    assert results.take({"text": "几点", "mode": "2pass-online", "is_final": False, "slice_type": 1}) == "现在几点"
    # a VAD sentence end mid-stream: the corrected sentence, not yet the final
    assert results.take({"text": "现在几点，", "mode": "2pass-offline", "is_final": False, "slice_type": 2}) is None
    assert results.final is None
    assert results.take({"text": "了", "mode": "2pass-online", "is_final": False}) == "现在几点，了"
    results.ended = True
    results.take({"text": "了。", "mode": "2pass-offline", "is_final": True, "slice_type": 2})
    assert results.final is not None and results.partials == 3
    assert results.text() == "现在几点，了。"


def test_2pass_final_without_offline_text_keeps_the_partials():
    results = Results("2pass")
    results.take({"text": "hello", "mode": "2pass-online", "is_final": False})
    results.ended = True
    results.take({"text": "", "wav_name": "x", "is_final": True, "timestamp": ""})
    assert results.text() == "hello"


def test_is_final_before_the_end_of_audio_does_not_end_2pass():
    results = Results("2pass")
    results.take({"text": "a", "mode": "2pass-offline", "is_final": True})
    assert results.final is None


def test_the_pcm_only_refusal_is_bad_audio():
    results = Results("2pass")
    with pytest.raises(EngineError) as err:
        results.take({"text": "ERROR. Real-time transcription service ONLY SUPPORT PCM stream.", "wav_name": "x", "is_final": True})
    assert err.value.reason == "bad_audio" and "ONLY SUPPORT PCM" in str(err.value)


@pytest.mark.parametrize(("final", "reason"), [({"mode": "offline", "is_final": False}, "protocol"), ({"mode": "offline", "text": " ", "is_final": False}, "server"), ({"mode": "offline", "text": 3}, "protocol")])
def test_a_final_with_no_text(final, reason):
    results = Results("offline")
    results.ended = True
    results.take(final)
    with pytest.raises(EngineError) as err:
        results.text()
    assert err.value.reason == reason


def test_a_2pass_final_with_no_text_at_all():
    results = Results("2pass")
    results.ended = True
    results.take({"mode": "2pass-offline", "is_final": True})
    with pytest.raises(EngineError) as err:
        results.text()
    assert err.value.reason == "protocol"


# --- over a socket ---------------------------------------------------------------------


def _app(seen: list) -> web.Application:
    """Answers with the number of PCM bytes received and a checksum of them, so order matters."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("binary",))
        await ws.prepare(request)
        audio = bytearray()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                message = json.loads(msg.data)
                seen.append(message)
                if message.get("is_speaking") is False:
                    digest = int(np.frombuffer(bytes(audio), dtype="<i2").astype(np.int64) @ np.arange(len(audio) // 2))
                    await ws.send_str(json.dumps({"mode": "2pass-offline", "text": f"{len(audio)} {digest}", "wav_name": "xiaozhi", "is_final": True}))
            else:
                audio += msg.data
                seen.append(len(msg.data))
                if len(seen) == 3:
                    await ws.send_str(json.dumps({"mode": "2pass-online", "text": "partial", "wav_name": "xiaozhi", "is_final": False}))
        return ws

    app = web.Application()
    app.router.add_get("/", handle)
    return app


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=funasr-test", "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True,
        capture_output=True,
    )
    return folder / "cert.pem", folder / "key.pem"


async def _serve(tls: ssl.SSLContext | None):
    seen: list = []
    runner = web.AppRunner(_app(seen))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    return runner, port, seen


async def _roundtrip(cfg: FunAsrEngineSettings, pcm: np.ndarray):
    engine = FunAsrEngine("funasr-test", cfg, None)
    partials: list[str] = []

    async def on_partial(text: str) -> None:
        partials.append(text)

    try:
        stream = await engine.open_stream(AsrRequest(hotwords=["Xiaozhi"]), on_partial)
        for start in range(0, len(pcm), 1000):  # pieces that are not frame-aligned
            await stream.send(pcm[start : start + 1000])
        return await stream.finish(), partials
    finally:
        await engine.close()


PCM = (np.arange(16000 + 333) % 2000 - 1000).astype(np.int16)
EXPECTED = f"{len(PCM) * 2} {int(PCM.astype(np.int64) @ np.arange(len(PCM)))}"


async def test_the_audio_arrives_whole_in_order_in_frames_over_plain_ws():
    runner, port, seen = await _serve(None)
    try:
        transcript, partials = await _roundtrip(FunAsrEngineSettings(url=f"ws://127.0.0.1:{port}/", mode="2pass"), PCM)
    finally:
        await runner.cleanup()
    assert transcript.text == EXPECTED and transcript.audio_s == pytest.approx(len(PCM) / 16000)
    assert partials == ["partial"]
    assert seen[0]["mode"] == "2pass" and seen[0]["hotwords"] == '{"Xiaozhi": 20}'
    frames = [n for n in seen if isinstance(n, int)]
    assert set(frames[:-1]) == {1920} and 0 < frames[-1] <= 1920
    assert seen[-1] == {"is_speaking": False}


async def test_wss_with_a_self_signed_certificate(certificate):
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    runner, port, _ = await _serve(tls)
    try:
        transcript, _ = await _roundtrip(FunAsrEngineSettings(url=f"wss://127.0.0.1:{port}/", mode="2pass", verify_tls=False), PCM)
        assert transcript.text == EXPECTED
        with pytest.raises(EngineError) as err:
            await _roundtrip(FunAsrEngineSettings(url=f"wss://127.0.0.1:{port}/", mode="2pass", verify_tls=True), PCM)
        assert err.value.reason == "unavailable" and "certificate" in str(err.value).lower()
    finally:
        await runner.cleanup()


async def test_nothing_listening_is_unavailable():
    with pytest.raises(EngineError) as err:
        await _roundtrip(FunAsrEngineSettings(url=f"ws://127.0.0.1:{free_port()}/"), PCM)
    assert err.value.reason == "unavailable"


async def test_cancel_closes_the_connection():
    runner, port, seen = await _serve(None)
    try:
        engine = FunAsrEngine("funasr-test", FunAsrEngineSettings(url=f"ws://127.0.0.1:{port}/"), None)
        stream = await engine.open_stream(AsrRequest())
        await stream.send(PCM[:4000])
        await stream.cancel()
        assert stream.ws.closed
        await engine.close()
        await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    assert seen[0]["mode"] == "offline" and {"is_speaking": False} not in seen
