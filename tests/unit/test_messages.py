"""shared.messages: utterance packing, audio frame headers, JSON events."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.messages import (
    HDR_INDEX,
    HDR_KIND,
    HDR_SEQ,
    HDR_TURN,
    KIND_AUDIO,
    AudioFrameMeta,
    Control,
    OutEvent,
    ToolSpec,
    Utterance,
    new_turn_id,
)

# Opus-like packets: a TOC byte then compressed data, of typical and edge sizes.
OPUS_FRAMES = [b"\xf8\xff\xfe", b"\x78" + bytes(range(200)), b"\x08" + b"\x00" * 119, b"\xfc" * 1275, b""]


def utterance(**kw) -> Utterance:
    base = dict(session_id="s1", turn_id="t1", device_id="aa:bb", sample_rate=16000, speech_end_ms=1234)
    base.update(kw)
    return Utterance(**base)


def test_utterance_round_trip() -> None:
    meta = utterance()
    body = meta.pack(OPUS_FRAMES)
    got, frames = Utterance.unpack(body)
    assert frames == OPUS_FRAMES
    assert got.frames == len(OPUS_FRAMES)
    assert (got.session_id, got.turn_id, got.device_id, got.sample_rate, got.speech_end_ms) == (
        "s1", "t1", "aa:bb", 16000, 1234,
    )  # fmt: skip


def test_pack_sets_frames_without_mutating_the_original() -> None:
    meta = utterance()
    meta.pack([b"a", b"b"])
    assert meta.frames == 0
    assert Utterance.unpack(meta.pack([b"a", b"b"]))[0].frames == 2


def test_pack_layout() -> None:
    body = utterance().pack([b"xy", b"z"])
    (hlen,) = struct.unpack_from(">I", body, 0)
    header = json.loads(body[4 : 4 + hlen])
    assert header["frames"] == 2
    assert body[4 + hlen :] == b"\x00\x02xy\x00\x01z"


def test_utterance_without_frames() -> None:
    meta, frames = Utterance.unpack(utterance().pack([]))
    assert frames == [] and meta.frames == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=1500), max_size=30), st.text(max_size=20))
def test_utterance_round_trip_property(frames: list[bytes], device: str) -> None:
    meta, got = Utterance.unpack(utterance(device_id=device).pack(frames))
    assert got == frames
    assert meta.device_id == device


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_truncated_utterance_raises_value_error(cut: int) -> None:
    body = utterance().pack([b"abc", b"defgh"])
    with pytest.raises(ValueError):
        Utterance.unpack(body[:-cut])


def test_every_truncation_raises_value_error() -> None:
    body = utterance().pack([b"abc", b"defgh"])
    for n in range(len(body)):
        with pytest.raises(ValueError):
            Utterance.unpack(body[:n])


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x00",
        b"\x00\x00\x00\x10{}",  # header length beyond the body
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x02{}",  # valid JSON but no session_id / turn_id
        b"\x00\x00\x00\x04nope",  # not JSON
        b"garbage that is not an utterance at all",
    ],
)
def test_garbage_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        Utterance.unpack(body)


def test_frame_count_mismatch_raises_value_error() -> None:
    body = utterance().pack([b"a", b"b"])
    extra = body + b"\x00\x01c"  # a third, well-formed frame the header does not announce
    with pytest.raises(ValueError, match="frames"):
        Utterance.unpack(extra)


def test_pydantic_validation_error_is_a_value_error() -> None:
    # unpack relies on this to keep its "raises ValueError" promise for bad JSON
    assert issubclass(ValidationError, ValueError)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_unpack_arbitrary_bytes_only_raises_value_error(data: bytes) -> None:
    try:
        Utterance.unpack(data)
    except ValueError:
        pass


# --------------------------------------------------------------------------- AudioFrameMeta


def test_audio_frame_meta_headers_round_trip() -> None:
    meta = AudioFrameMeta(turn_id="abc123", seq=4, index=17)
    headers = meta.headers()
    assert headers == {HDR_KIND: KIND_AUDIO, HDR_TURN: "abc123", HDR_SEQ: "4", HDR_INDEX: "17"}
    assert all(isinstance(v, str) for v in headers.values())
    assert AudioFrameMeta.from_headers(headers) == meta


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20), st.integers(0, 10**6), st.integers(0, 10**6))
def test_audio_frame_meta_property(turn: str, seq: int, index: int) -> None:
    meta = AudioFrameMeta(turn_id=turn, seq=seq, index=index)
    assert AudioFrameMeta.from_headers(meta.headers()) == meta


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {},
        {HDR_TURN: "t", HDR_SEQ: "1", HDR_INDEX: "2"},  # no kind
        {HDR_KIND: "event", HDR_TURN: "t", HDR_SEQ: "1", HDR_INDEX: "2"},
        {HDR_KIND: KIND_AUDIO, HDR_SEQ: "1", HDR_INDEX: "2"},  # no turn
        {HDR_KIND: KIND_AUDIO, HDR_TURN: "t", HDR_INDEX: "2"},  # no seq
        {HDR_KIND: KIND_AUDIO, HDR_TURN: "t", HDR_SEQ: "1"},  # no index
        {HDR_KIND: KIND_AUDIO, HDR_TURN: "t", HDR_SEQ: "one", HDR_INDEX: "2"},
        {HDR_KIND: KIND_AUDIO, HDR_TURN: "t", HDR_SEQ: "1", HDR_INDEX: "2.5"},
        {HDR_KIND: KIND_AUDIO, HDR_TURN: "t", HDR_SEQ: "", HDR_INDEX: "2"},
    ],
)
def test_audio_frame_meta_missing_or_bad_headers(headers) -> None:
    assert AudioFrameMeta.from_headers(headers) is None


# --------------------------------------------------------------------------- JSON messages


def test_out_event_encode_decode() -> None:
    event = OutEvent(
        kind="turn_end", session_id="s", turn_id="t", seq=3, text="你好", emotion="happy", frames=9, sentences=4, close_after=True
    )
    data = event.encode()
    assert isinstance(data, bytes)
    assert OutEvent.decode(data) == event
    assert json.loads(data)["kind"] == "turn_end"


def test_out_event_defaults() -> None:
    event = OutEvent.decode(b'{"kind":"stt","session_id":"s","turn_id":"t"}')
    assert (event.seq, event.text, event.emotion, event.frames, event.sentences, event.close_after) == (0, "", "", 0, 0, False)


def test_out_event_ignores_unknown_fields() -> None:
    event = OutEvent.decode(b'{"kind":"stt","session_id":"s","turn_id":"t","future":1}')
    assert event.kind == "stt"


@pytest.mark.parametrize(
    "data",
    [
        b'{"kind":"bogus","session_id":"s","turn_id":"t"}',
        b'{"kind":"stt","session_id":"s"}',
        b'{"kind":"stt","session_id":"s","turn_id":"t","seq":"x"}',
        b"not json",
    ],
)
def test_out_event_rejects_bad_input(data: bytes) -> None:
    with pytest.raises(ValueError):
        OutEvent.decode(data)


def test_control_kind_is_checked() -> None:
    assert Control.decode(Control(session_id="s", kind="abort").encode()).kind == "abort"
    with pytest.raises(ValueError):
        Control(session_id="s", kind="explode")


def test_tool_spec_openai_shape() -> None:
    spec = ToolSpec(name="get_time", description="The time", keywords=["time"])
    assert spec.openai() == {
        "type": "function",
        "function": {"name": "get_time", "description": "The time", "parameters": {"type": "object", "properties": {}}},
    }


def test_new_turn_id() -> None:
    ids = {new_turn_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
