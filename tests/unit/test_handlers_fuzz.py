"""Property tests: arbitrary JSON against every handler of device input in the pure core.

Whatever a device (or something pretending to be one) sends, the handlers either take it or
refuse it with :class:`ProtocolError`; they never raise anything else, never loop, and what they
build from it stays well-formed.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import iot, mcp
from gateway.protocol import Hello, ProtocolError, parse_message
from gateway.turns import TurnAssembler
from shared.messages import OutEvent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)
# Objects shaped like the real messages, with any values in any field.
KEYS = ["type", "state", "mode", "text", "reason", "payload", "features", "audio_params", "version", "transport",
        "sample_rate", "frame_duration", "descriptors", "states", "session_id", "result", "error", "id", "tools",
        "nextCursor", "content", "name", "properties", "methods", "inputSchema", "serverInfo", "isError"]
message_like = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8)
typed_message = st.builds(
    lambda t, rest: {**rest, "type": t},
    st.sampled_from(["hello", "listen", "abort", "mcp", "iot", "ping", "goodbye", "unknown", ""]),
    message_like,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(json_values | message_like | typed_message)
def test_parse_message_takes_any_json_or_refuses_it(value) -> None:
    try:
        parsed = parse_message(json.dumps(value))
    except ProtocolError:
        return
    if isinstance(parsed, Hello):
        assert parsed.audio.sample_rate in (8000, 12000, 16000, 24000, 48000)
        assert 10 <= parsed.audio.frame_duration <= 120
        assert isinstance(parsed.features, dict)


@FUZZ
@given(st.lists(message_like | json_values, max_size=6))
def test_device_mcp_replies_of_any_shape(payloads) -> None:
    state = mcp.McpState()
    for payload in payloads:
        if not isinstance(payload, dict):
            continue
        assert isinstance(state.on_initialize_result(payload), dict)
        follow_up = state.on_tools_list_result(payload)
        assert follow_up is None or follow_up["method"] == "tools/list"
        ok, text = mcp.result_text(payload)
        assert isinstance(ok, bool) and isinstance(text, str)
    assert state.pages <= len(payloads)
    for tool in state.tools:
        assert isinstance(tool.name, str) and isinstance(tool.input_schema, dict)
        assert state.find(tool.llm_name) is tool or state.find(tool.name) is not None


@FUZZ
@given(st.lists(message_like, max_size=6))
def test_legacy_iot_messages_of_any_shape(messages) -> None:
    state = iot.IotState()
    for message in messages:
        state.update(message)
    for tool in state.tools():
        assert isinstance(tool.name, str)
        ok, text = state.read(tool)
        assert isinstance(ok, bool) and isinstance(text, str)
        assert isinstance(iot.command(tool, {}), dict)


out_kinds = st.sampled_from(["stt", "emotion", "sentence_start", "sentence_end", "turn_end", "error"])
out_events = st.builds(
    lambda kind, turn, seq, frames, sentences, text: OutEvent(kind=kind, session_id="s", turn_id=turn, seq=seq, frames=frames, sentences=sentences, text=text),
    out_kinds, st.sampled_from(["t1", "t2", "t3"]), st.integers(-3, 5), st.integers(-3, 6), st.integers(-3, 5), st.text(max_size=8),
)
audio = st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.integers(-3, 5), st.integers(-3, 8))


@FUZZ
@given(st.lists(out_events | audio, max_size=40))
def test_turn_assembler_survives_any_event_order_from_the_stages(inputs) -> None:
    """Stages (or a confused worker) may send anything in any order: the assembler stays
    bounded, and never plays audio outside an open reply."""
    asm = TurnAssembler()
    open_reply = False
    for item in inputs:
        actions = asm.on_event(item) if isinstance(item, OutEvent) else asm.on_audio(item[0], item[1], item[2], b"x")
        for action in actions:
            name = type(action).__name__
            if name == "Text" and action.kind == "tts_start":
                open_reply = True
            elif name == "Stop":
                open_reply = False
            elif name == "Audio":
                assert open_reply
    assert len(asm._pending) <= asm.max_pending_turns
