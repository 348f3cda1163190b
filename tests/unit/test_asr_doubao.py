"""The doubao engine's protocol pieces (asr_svc/remote/doubao.py), byte for byte against the
vendor's "大模型流式语音识别API" (https://www.volcengine.com/docs/6561/1354869): the 4-byte
header, the sequence and payload-size fields, gzip payloads, the last packet, error frames, the
request JSON (hotwords in ``request.corpus.context``) and the error codes' reasons."""

from __future__ import annotations

import gzip
import json
import struct

import pytest

from asr_svc.providers import AsrRequest
from asr_svc.remote import doubao
from shared.settings import DoubaoAsrEngineSettings


def test_the_full_client_request_is_laid_out_as_the_doc_says():
    frame = doubao.full_client_request({"request": {"model_name": "bigmodel"}}, sequence=1)
    # version 1 | header size 1; full client request | positive sequence; JSON | gzip; reserved
    assert frame[:4] == bytes([0x11, 0x11, 0x11, 0x00])
    assert struct.unpack(">i", frame[4:8]) == (1,)
    (size,) = struct.unpack(">I", frame[8:12])
    assert size == len(frame) - 12
    assert json.loads(gzip.decompress(frame[12:])) == {"request": {"model_name": "bigmodel"}}


def test_audio_packets_count_up_and_the_last_goes_negative():
    pcm = bytes(range(256)) * 25
    middle = doubao.audio_request(pcm, 2)
    assert middle[:4] == bytes([0x11, 0x21, 0x01, 0x00])  # audio only | positive seq; raw | gzip
    assert struct.unpack(">i", middle[4:8]) == (2,)
    assert gzip.decompress(middle[12:]) == pcm
    last = doubao.audio_request(pcm, 7, last=True)
    assert last[1] == 0x23  # audio only | last packet with a negative sequence
    assert struct.unpack(">i", last[4:8]) == (-7,)
    frame = doubao.decode_frame(last)
    assert frame.last and frame.sequence == -7 and frame.payload == pcm


def test_a_server_response_decodes_with_its_text_and_flags():
    result = {"result": {"text": "现在几点了", "utterances": [{"text": "现在几点了", "definite": True}]}}
    frame = doubao.decode_frame(doubao.server_response(result, 3, last=True))
    assert (frame.message_type, frame.flags, frame.sequence) == (doubao.FULL_SERVER_RESPONSE, 0b0011, 3)
    assert frame.last and frame.payload == result
    partial = doubao.decode_frame(doubao.server_response({"result": {"text": "what"}}, 2))
    assert not partial.last and partial.sequence == 2
    assert doubao._final_text(frame.payload) == "现在几点了"
    assert doubao._final_text({"result": [{"text": "as a list"}]}) == "as a list"  # the doc's table says list


def test_a_response_without_a_sequence_field_still_decodes():
    raw = bytes([0x11, 0x90, 0x10, 0x00]) + struct.pack(">I", 2) + b"{}"
    frame = doubao.decode_frame(raw)
    assert frame.sequence is None and frame.payload == {}


def test_error_frames_carry_a_code_and_the_message():
    frame = doubao.decode_frame(doubao.error_frame(45000151, "音频格式不正确"))
    assert frame.message_type == doubao.SERVER_ERROR and frame.code == 45000151 and frame.payload == "音频格式不正确"
    raw = doubao.error_frame(45000001, "x")
    assert raw[:4] == bytes([0x11, 0xF0, 0x10, 0x00]) and struct.unpack(">I", raw[4:8]) == (45000001,)
    # The doc's example says the message may be a JSON object: take its text.
    body = json.dumps({"error": "request params invalid"}).encode()
    raw = bytes([0x11, 0xF0, 0x10, 0x00]) + struct.pack(">II", 45000001, len(body)) + body
    assert doubao.decode_frame(raw).payload == "request params invalid"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<html><body>502 Bad Gateway</body></html>",
        bytes([0x21, 0x91, 0x11, 0x00]) + b"\x00" * 8,  # protocol version 2
        bytes([0x11, 0x51, 0x11, 0x00]) + b"\x00" * 8,  # message type 0b0101
        bytes([0x11, 0x91, 0x11, 0x00]) + struct.pack(">iI", 1, 50) + b"short",  # size says 50
        bytes([0x11, 0x91, 0x11, 0x00]) + struct.pack(">iI", 1, 4) + b"nogz",  # not gzip
        bytes([0x11, 0x91, 0x10, 0x00]) + struct.pack(">iI", 1, 4) + b"{{{{",  # not JSON
        bytes([0x11, 0x91]),
    ],
)
def test_bytes_that_are_no_frame_are_a_protocol_error(data):
    with pytest.raises(doubao.ProtocolError):
        doubao.decode_frame(data)


def test_the_request_json_has_the_documented_fields_and_the_hotwords():
    cfg = DoubaoAsrEngineSettings(app_key="1", api_key="t")
    params = doubao.request_params(cfg, AsrRequest(language="zh", hotwords=["小智", "Xiaozhi"], session_id="s1"), cfg.url)
    assert params["audio"] == {"format": "pcm", "codec": "raw", "rate": 16000, "bits": 16, "channel": 1}
    assert params["user"] == {"uid": "s1"}
    req = params["request"]
    assert req["model_name"] == "bigmodel" and req["enable_itn"] and req["enable_punc"] and req["show_utterances"]
    # corpus.context is a JSON string, not an object (doc: 热词直传)
    assert json.loads(req["corpus"]["context"]) == {"hotwords": [{"word": "小智"}, {"word": "Xiaozhi"}]}
    assert "corpus" not in doubao.request_params(cfg, AsrRequest(), cfg.url)["request"]


def test_only_the_nostream_endpoint_gets_a_language():
    cfg = DoubaoAsrEngineSettings()
    assert "language" not in doubao.request_params(cfg, AsrRequest(language="zh"), "wss://openspeech.bytedance.com/api/v3/sauc/bigmodel")["audio"]
    nostream = "wss://openspeech.bytedance.com/api/v3/sauc/bigmodel_nostream"
    assert doubao.request_params(cfg, AsrRequest(language="zh"), nostream)["audio"]["language"] == "zh-CN"
    assert doubao.request_params(cfg, AsrRequest(language="en"), nostream)["audio"]["language"] == "en-US"
    assert doubao.request_params(DoubaoAsrEngineSettings(language="de-DE"), AsrRequest(language="en"), nostream)["audio"]["language"] == "de-DE"
    assert "language" not in doubao.request_params(cfg, AsrRequest(language="xx"), nostream)["audio"]


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (45000001, "请求参数无效", "protocol"),
        (45000002, "空音频", "bad_audio"),
        (45000151, "音频格式不正确", "bad_audio"),
        (45000081, "等包超时", "protocol"),
        (55000031, "服务器繁忙", "rate_limited"),
        (55000123, "internal", "server"),
        (45000292, "quota exceeded for types: concurrency", "rate_limited"),
        (45000292, "quota exceeded for types: volc.bigasr.sauc.duration_lifetime", "quota"),
        (45000010, "load grant: requested grant not found in SaaS storage", "auth"),
    ],
)
def test_error_codes_map_to_fallback_reasons(code, message, reason):
    assert doubao.reason_for_code(code, message) == reason


def test_a_refused_handshake_names_the_vendors_answer():
    body = json.dumps({"code": 45000010, "message": "load grant: requested grant not found in SaaS storage"}).encode()
    err = doubao._handshake_error(401, {"X-Tt-Logid": "2026ABC"}, body)
    assert err.reason == "auth"
    assert str(err) == "HTTP 401 45000010: load grant: requested grant not found in SaaS storage (logid 2026ABC)"
    assert doubao._handshake_error(403, {}, b'{"code": 45000030, "message": "requested resource not granted"}').reason == "auth"
    assert doubao._handshake_error(502, {}, b"<html>bad gateway</html>").reason == "server"
    headers_only = doubao._handshake_error(401, {"X-Api-Status-Code": "45000010", "X-Api-Message": "invalid token"}, b"")
    assert str(headers_only) == "HTTP 401 45000010: invalid token"
