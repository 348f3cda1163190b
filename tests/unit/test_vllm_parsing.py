"""The pure part of the vLLM backend: reading Hermes-style tool calls."""

from llm_svc.vllm_backend import parse_tool_calls


def test_hermes_tool_calls():
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>{"name": "set_volume", "arguments": {"volume": 80}}</tool_call>'
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [("get_time", "{}"), ("set_volume", '{"volume": 80}')]


def test_no_or_broken_tool_calls():
    assert parse_tool_calls("It is sunny today.") == []
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") == []
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>') == []


def test_argument_strings_are_bounded():
    """The constrained argument step always closes its JSON: every free string gets a maxLength."""
    from llm_svc.backends import bounded_strings

    schema = {"type": "object", "properties": {"text": {"type": "string"}, "mode": {"type": "string", "enum": ["a", "b"]}, "items": {"type": "array", "items": {"type": "string", "maxLength": 5}}}}
    bounded = bounded_strings(schema)
    assert bounded["properties"]["text"]["maxLength"] == 200
    assert "maxLength" not in bounded["properties"]["mode"]
    assert bounded["properties"]["items"]["items"]["maxLength"] == 5
    assert "maxLength" not in schema["properties"]["text"]  # the tool's own schema is untouched
