"""gateway.protocol: binary framing v1/v2/v3, device messages, server messages."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol
from gateway.protocol import (
    Abort,
    AudioParams,
    Hello,
    Listen,
    Mcp,
    Ping,
    ProtocolError,
    Unknown,
    decode_audio,
    encode_audio,
    parse_message,
    parse_protocol_version,
)

OPUS_LIKE = [b"\x01", b"\xf8\xff\xfe", bytes(range(256)), b"\x00" * 1200, b"\x78" + b"\x9a" * 119]


# --------------------------------------------------------------------------- framing: round trips


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("opus", OPUS_LIKE)
def test_encode_decode_round_trip(version: int, opus: bytes) -> None:
    frame = encode_audio(opus, version, timestamp=123456)
    payload, timestamp = decode_audio(frame, version)
    assert payload == opus
    assert timestamp == (123456 if version == 2 else 0)


def test_v1_is_the_raw_packet() -> None:
    assert encode_audio(b"abc", 1) == b"abc"
    assert decode_audio(b"abc", 1) == (b"abc", 0)


def test_v2_header_layout() -> None:
    frame = encode_audio(b"OPUS", 2, timestamp=0x01020304)
    assert len(frame) == 16 + 4
    # version(2) type(2) reserved(4) timestamp(4) payload_size(4), big-endian
    assert frame[:16] == bytes.fromhex("0002" "0000" "00000000" "01020304" "00000004")
    assert frame[16:] == b"OPUS"
    assert struct.unpack(">HHIII", frame[:16]) == (2, 0, 0, 0x01020304, 4)


def test_v2_timestamp_is_wrapped_to_32_bits() -> None:
    frame = encode_audio(b"x", 2, timestamp=2**32 + 7)
    assert decode_audio(frame, 2) == (b"x", 7)


def test_v2_decode_reads_timestamp_from_a_device_frame() -> None:
    frame = struct.pack(">HHIII", 2, 0, 0, 987654321, 3) + b"abc"
    assert decode_audio(frame, 2) == (b"abc", 987654321)


def test_v3_header_layout() -> None:
    frame = encode_audio(b"\xaa" * 300, 3)
    assert frame[:4] == bytes([0, 0]) + (300).to_bytes(2, "big")
    assert len(frame) == 304
    assert frame[4:] == b"\xaa" * 300


def test_v3_max_payload_round_trips() -> None:
    opus = b"\x55" * (65535 - 4)
    assert decode_audio(encode_audio(opus, 3), 3) == (opus, 0)


def test_encode_v3_refuses_a_payload_its_header_cannot_describe() -> None:
    # A 2-byte length cannot describe 70 000 bytes: the encoder must refuse rather than
    # produce a frame whose header lies about its length.
    with pytest.raises((ProtocolError, struct.error)):
        encode_audio(b"x" * 70000, 3)


@pytest.mark.parametrize("version", [0, 4, -1, 99])
def test_unknown_version_is_rejected_by_both_directions(version: int) -> None:
    with pytest.raises(ProtocolError) as enc:
        encode_audio(b"x", version)
    assert enc.value.reason == "bad_protocol_version"
    with pytest.raises(ProtocolError) as dec:
        decode_audio(b"\x00\x00\x00\x01x", version)
    assert dec.value.reason == "bad_protocol_version"


# --------------------------------------------------------------------------- framing: errors


def _reason(data: bytes, version: int) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_audio(data, version)
    assert isinstance(info.value, ValueError)  # ProtocolError is a ValueError
    return info.value.reason


def test_empty_frame() -> None:
    assert _reason(b"", 1) == "empty_frame"
    assert _reason(b"", 2) == "short_header"
    assert _reason(b"", 3) == "short_header"
    # a well-formed header announcing an empty payload
    assert _reason(struct.pack(">HHIII", 2, 0, 0, 0, 0), 2) == "empty_frame"
    assert _reason(struct.pack(">BBH", 0, 0, 0), 3) == "empty_frame"


@pytest.mark.parametrize("length", [1, 8, 15])
def test_v2_short_header(length: int) -> None:
    assert _reason(b"\x00" * length, 2) == "short_header"


@pytest.mark.parametrize("length", [1, 2, 3])
def test_v3_short_header(length: int) -> None:
    assert _reason(b"\x00" * length, 3) == "short_header"


@pytest.mark.parametrize("declared", [1, 5, 100, 2**32 - 1])
def test_v2_wrong_length(declared: int) -> None:
    frame = struct.pack(">HHIII", 2, 0, 0, 0, declared) + b"abcd"
    assert _reason(frame, 2) == "bad_length"


@pytest.mark.parametrize("declared", [1, 5, 300, 65535])
def test_v3_wrong_length(declared: int) -> None:
    frame = struct.pack(">BBH", 0, 0, declared) + b"abcd"
    assert _reason(frame, 3) == "bad_length"


def test_v2_truncated_payload_is_bad_length() -> None:
    frame = encode_audio(b"0123456789", 2)
    assert _reason(frame[:-1], 2) == "bad_length"
    assert _reason(frame + b"!", 2) == "bad_length"


def test_v3_truncated_payload_is_bad_length() -> None:
    frame = encode_audio(b"0123456789", 3)
    assert _reason(frame[:-1], 3) == "bad_length"
    assert _reason(frame + b"!", 3) == "bad_length"


@pytest.mark.parametrize("ftype", [1, 2, 255])
def test_v2_wrong_type(ftype: int) -> None:
    frame = struct.pack(">HHIII", 2, ftype, 0, 0, 3) + b"abc"
    assert _reason(frame, 2) == "not_audio"


@pytest.mark.parametrize("ftype", [1, 2, 255])
def test_v3_wrong_type(ftype: int) -> None:
    frame = struct.pack(">BBH", ftype, 0, 3) + b"abc"
    assert _reason(frame, 3) == "not_audio"


@pytest.mark.parametrize("version", [1, 2, 3])
def test_frame_over_65535_bytes_is_rejected(version: int) -> None:
    big = b"\x01" * 65536
    assert _reason(big, version) == "frame_too_large"


def test_frame_of_exactly_65535_bytes_is_accepted_in_v1_and_v2() -> None:
    assert decode_audio(b"\x01" * 65535, 1) == (b"\x01" * 65535, 0)
    payload = b"\x02" * (65535 - 16)
    assert decode_audio(encode_audio(payload, 2), 2) == (payload, 0)


# --------------------------------------------------------------------------- Protocol-Version


@pytest.mark.parametrize("value", [None, "", "   "])
def test_protocol_version_defaults_to_1(value: str | None) -> None:
    assert parse_protocol_version(value) == 1


@pytest.mark.parametrize("value, expected", [("1", 1), ("2", 2), ("3", 3), (" 3 ", 3)])
def test_protocol_version_supported(value: str, expected: int) -> None:
    assert parse_protocol_version(value) == expected


@pytest.mark.parametrize("value", ["0", "4", "-1", "2.0", "two", "v2", "1,2"])
def test_protocol_version_bad(value: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_protocol_version(value)
    assert info.value.reason == "bad_protocol_version"


# --------------------------------------------------------------------------- hello


def test_full_device_hello() -> None:
    msg = parse_message(
        json.dumps(
            {
                "type": "hello",
                "version": 3,
                "transport": "websocket",
                "features": {"mcp": True},
                "audio_params": {"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 20},
            }
        )
    )
    assert msg == Hello(
        version=3,
        transport="websocket",
        features={"mcp": True},
        audio=AudioParams(format="opus", sample_rate=24000, channels=1, frame_duration=20),
    )


def test_browser_hello_without_anything_falls_back_to_defaults() -> None:
    msg = parse_message('{"type":"hello"}')
    assert isinstance(msg, Hello)
    assert msg.version is None
    assert msg.transport is None
    assert msg.features == {}
    assert msg.audio.sample_rate == 16000
    assert msg.audio.frame_duration == 60
    assert msg.audio.format == "opus"
    assert msg.audio.channels == 1


def test_hello_with_partial_audio_params() -> None:
    msg = parse_message('{"type":"hello","audio_params":{"frame_duration":40}}')
    assert isinstance(msg, Hello)
    assert msg.audio.sample_rate == 16000
    assert msg.audio.frame_duration == 40


@pytest.mark.parametrize("rate", [8000, 12000, 16000, 24000, 48000])
def test_hello_accepts_opus_rates(rate: int) -> None:
    msg = parse_message(json.dumps({"type": "hello", "audio_params": {"sample_rate": rate}}))
    assert msg.audio.sample_rate == rate


@pytest.mark.parametrize("rate", [44100, 0, -16000, 22050, "16000", None, True, [16000], 1e12])
def test_hello_bad_sample_rate_falls_back_to_16000(rate) -> None:
    msg = parse_message(json.dumps({"type": "hello", "audio_params": {"sample_rate": rate}}))
    assert isinstance(msg, Hello)
    assert msg.audio.sample_rate == 16000


@pytest.mark.parametrize("duration", [0, 5, 9, 121, 1000, -60, "60", None, False])
def test_hello_bad_frame_duration_falls_back_to_60(duration) -> None:
    msg = parse_message(json.dumps({"type": "hello", "audio_params": {"frame_duration": duration}}))
    assert msg.audio.frame_duration == 60


@pytest.mark.parametrize("duration", [10, 20, 60, 120])
def test_hello_frame_duration_in_range_is_kept(duration: int) -> None:
    msg = parse_message(json.dumps({"type": "hello", "audio_params": {"frame_duration": duration}}))
    assert msg.audio.frame_duration == duration


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"hello","version":Infinity}',
        '{"type":"hello","version":NaN}',
        '{"type":"hello","version":-Infinity}',
        '{"type":"hello","audio_params":{"sample_rate":1e400}}',
        '{"type":"hello","audio_params":{"frame_duration":NaN}}',
    ],
)
def test_hello_non_finite_numbers_fall_back(text: str) -> None:
    # json.loads accepts Infinity/NaN (and 1e400 overflows to inf): they must not crash parsing.
    msg = parse_message(text)
    assert isinstance(msg, Hello)
    assert msg.version is None
    assert msg.audio.sample_rate == 16000
    assert msg.audio.frame_duration == 60


def test_hello_wrongly_typed_fields_are_ignored() -> None:
    msg = parse_message('{"type":"hello","version":"1","transport":7,"features":[1],"audio_params":"opus"}')
    assert msg == Hello()


def test_hello_channels_forced_to_mono_and_format_kept() -> None:
    msg = parse_message('{"type":"hello","audio_params":{"channels":2,"format":"pcm"}}')
    assert msg.audio.channels == 1
    assert msg.audio.format == "pcm"


# --------------------------------------------------------------------------- listen / abort / mcp / ping


def test_listen_start_mode_defaults_to_auto() -> None:
    assert parse_message('{"type":"listen","state":"start"}') == Listen(state="start", mode="auto")


@pytest.mark.parametrize("mode", ["auto", "manual", "realtime"])
def test_listen_start_keeps_known_mode(mode: str) -> None:
    assert parse_message(json.dumps({"type": "listen", "state": "start", "mode": mode})) == Listen("start", mode)


@pytest.mark.parametrize("mode", ["push", "", 1, None])
def test_listen_start_unknown_mode_is_auto(mode) -> None:
    assert parse_message(json.dumps({"type": "listen", "state": "start", "mode": mode})).mode == "auto"


def test_listen_stop_has_no_mode() -> None:
    assert parse_message('{"type":"listen","state":"stop","mode":"manual"}') == Listen(state="stop", mode=None)


def test_listen_detect_carries_text() -> None:
    msg = parse_message('{"type":"listen","state":"detect","text":"你好小智"}')
    assert msg == Listen(state="detect", mode=None, text="你好小智")


@pytest.mark.parametrize("extra", ["", ',"text":null', ',"text":5'])
def test_listen_detect_without_text_is_an_error(extra: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message('{"type":"listen","state":"detect"' + extra + "}")
    assert info.value.reason == "detect_without_text"


@pytest.mark.parametrize("state", [None, "begin", "", 1])
def test_listen_bad_state(state) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(json.dumps({"type": "listen", "state": state}))
    assert info.value.reason == "bad_listen_state"


def test_abort_with_and_without_reason() -> None:
    assert parse_message('{"type":"abort"}') == Abort(reason=None)
    assert parse_message('{"type":"abort","reason":"wake_word_detected"}') == Abort(reason="wake_word_detected")
    assert parse_message('{"type":"abort","reason":3}') == Abort(reason=None)


def test_mcp() -> None:
    payload = {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}
    assert parse_message(json.dumps({"type": "mcp", "payload": payload})) == Mcp(payload=payload)


@pytest.mark.parametrize("payload", ["", ',"payload":"x"', ',"payload":[1]'])
def test_mcp_without_payload(payload: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message('{"type":"mcp"' + payload + "}")
    assert info.value.reason == "mcp_without_payload"


def test_ping() -> None:
    assert isinstance(parse_message('{"type":"ping"}'), Ping)


def test_unknown_type_is_kept_not_rejected() -> None:
    msg = parse_message('{"type":"iot","states":[1]}')
    assert msg == Unknown(type="iot", raw={"type": "iot", "states": [1]})


def test_unknown_type_name_is_truncated() -> None:
    msg = parse_message(json.dumps({"type": "x" * 500}))
    assert isinstance(msg, Unknown)
    assert msg.type == "x" * 64


@pytest.mark.parametrize("text", ["", "{", "hello", '{"type":"hello"', "{'type':'hello'}", "[1,", "\x00"])
def test_malformed_json(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    assert info.value.reason == "bad_json"


def test_deeply_nested_json_is_bad_json_not_a_crash() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message("[" * 30000 + "]" * 30000)
    assert info.value.reason == "bad_json"


@pytest.mark.parametrize("text", ["[]", '["type","hello"]', "1", '"hello"', "null", "true"])
def test_non_object_json(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    assert info.value.reason == "not_an_object"


@pytest.mark.parametrize("text", ["{}", '{"state":"start"}', '{"type":null}', '{"type":1}', '{"type":["hello"]}'])
def test_missing_type(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    assert info.value.reason == "missing_type"


def test_oversized_text_frame() -> None:
    text = json.dumps({"type": "ping", "pad": "x" * 70000})
    with pytest.raises(ProtocolError) as info:
        parse_message(text)
    assert info.value.reason == "frame_too_large"


def test_protocol_error_message_and_reason() -> None:
    err = ProtocolError("bad_json", "detail here")
    assert err.reason == "bad_json"
    assert str(err) == "bad_json: detail here"
    assert str(ProtocolError("x")) == "x"


# --------------------------------------------------------------------------- server messages


def test_server_hello() -> None:
    obj = json.loads(protocol.server_hello("sess-1", 24000, 60))
    assert obj["type"] == "hello"
    assert obj["transport"] == "websocket"
    assert obj["session_id"] == "sess-1"
    assert obj["audio_params"]["sample_rate"] == 24000
    assert obj["audio_params"]["frame_duration"] == 60
    assert obj["audio_params"]["format"] == "opus"
    assert obj["audio_params"]["channels"] == 1
    assert obj["version"] == 1
    assert json.loads(protocol.server_hello("s", 16000, 20, version=3))["version"] == 3


def test_tts_and_stt_builders() -> None:
    assert json.loads(protocol.stt("s", "hi there")) == {"type": "stt", "text": "hi there", "session_id": "s"}
    assert json.loads(protocol.tts_start("s")) == {"type": "tts", "state": "start", "session_id": "s"}
    assert json.loads(protocol.tts_stop("s")) == {"type": "tts", "state": "stop", "session_id": "s"}
    assert json.loads(protocol.sentence_start("s", "Hello.")) == {
        "type": "tts",
        "state": "sentence_start",
        "text": "Hello.",
        "session_id": "s",
    }


def test_server_messages_keep_unicode_unescaped() -> None:
    text = protocol.stt("s", "你好")
    assert "你好" in text
    assert json.loads(text)["text"] == "你好"


def test_llm_emotion_known() -> None:
    obj = json.loads(protocol.llm_emotion("s", "sad"))
    assert obj == {"type": "llm", "text": "😔", "emotion": "sad", "session_id": "s"}


@pytest.mark.parametrize("emotion", ["ecstatic", "", "HAPPY"])
def test_llm_emotion_unknown_falls_back_to_happy(emotion: str) -> None:
    obj = json.loads(protocol.llm_emotion("s", emotion))
    assert obj["emotion"] == "happy"
    assert obj["text"] == protocol.EMOTION_EMOJI["happy"]


def test_pong() -> None:
    obj = json.loads(protocol.pong())
    assert obj["type"] == "pong"
    assert isinstance(obj["timestamp"], str) and len(obj["timestamp"]) == 19


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_parse_message_arbitrary_text_only_raises_protocol_error(text: str) -> None:
    try:
        parse_message(text)
    except ProtocolError:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["hello", "listen", "abort", "mcp", "ping", "other"]),
    st.dictionaries(
        st.sampled_from(
            ["version", "transport", "features", "audio_params", "state", "mode", "text", "reason", "payload"]
        ),
        _json_values | st.fixed_dictionaries({}, optional={"sample_rate": _json_values, "frame_duration": _json_values, "format": _json_values}),
        max_size=5,
    ),
)
def test_parse_message_structured_fuzz(mtype: str, fields: dict) -> None:
    """Well-formed JSON objects with arbitrary field values: a typed message or a ProtocolError."""
    text = json.dumps({"type": mtype, **fields})  # allow_nan: emits NaN/Infinity like a sloppy client
    try:
        msg = parse_message(text)
    except ProtocolError:
        return
    assert isinstance(msg, (Hello, Listen, Abort, Mcp, Ping, Unknown))
    if isinstance(msg, Hello):
        assert msg.audio.sample_rate in (8000, 12000, 16000, 24000, 48000)
        assert 10 <= msg.audio.frame_duration <= 120


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([1, 2, 3]))
def test_decode_audio_arbitrary_bytes_only_raises_protocol_error(data: bytes, version: int) -> None:
    try:
        payload, timestamp = decode_audio(data, version)
    except ProtocolError:
        return
    assert payload  # never an empty payload
    assert isinstance(timestamp, int)
    # whatever was accepted re-encodes to the very same frame (v2: header fields are fixed)
    if version in (1, 3):
        assert encode_audio(payload, version) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.sampled_from([1, 2, 3]), st.integers(0, 2**32 - 1))
def test_round_trip_property(opus: bytes, version: int, timestamp: int) -> None:
    assert decode_audio(encode_audio(opus, version, timestamp), version) == (opus, timestamp if version == 2 else 0)
