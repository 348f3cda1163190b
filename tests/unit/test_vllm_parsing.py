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
