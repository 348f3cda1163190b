"""The aliyun engine's DashScope realtime ASR encoding and decoding (pure functions), checked
against the documented messages: help.aliyun.com/zh/model-studio/websocket-for-paraformer-real-time-service,
alibabacloud.com/help/en/model-studio/paraformer-client-events and .../paraformer-server-events,
help.aliyun.com/en/model-studio/error-code; task ids as in dashscope/dashscope-sdk-python
dashscope/audio/asr/recognition.py (uuid4().hex)."""

from __future__ import annotations

import json

import pytest

from asr_svc.providers import EngineError
from asr_svc.remote.aliyun import failure, failure_reason, finish_task, handshake_failure, language_hint, new_task_id, parse_event, run_task
from tests.standins.aliyun import check_run_task


def test_run_task_is_the_documented_instruction():
    task_id = new_task_id()
    message = json.loads(run_task(task_id, "paraformer-realtime-v2", language="zh-CN", vocabulary_id="vocab-1", extra={"max_sentence_silence": 800, "format": "wav"}))
    assert message["header"] == {"action": "run-task", "task_id": task_id, "streaming": "duplex"}
    payload = message["payload"]
    assert (payload["task_group"], payload["task"], payload["function"], payload["model"], payload["input"]) == ("audio", "asr", "recognition", "paraformer-realtime-v2", {})
    # format and sample_rate are what the engine sends; extra parameters cannot override them
    assert payload["parameters"] == {"format": "pcm", "sample_rate": 16000, "language_hints": ["zh"], "vocabulary_id": "vocab-1", "max_sentence_silence": 800}
    assert check_run_task(message) is None  # and the stand-in accepts it


def test_run_task_without_language_or_vocabulary_sends_neither():
    parameters = json.loads(run_task(new_task_id(), "fun-asr-realtime"))["payload"]["parameters"]
    assert parameters == {"format": "pcm", "sample_rate": 16000}


def test_task_ids_are_32_hex_digits_and_fresh():
    ids = {new_task_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_finish_task():
    assert json.loads(finish_task("ab" * 16)) == {"header": {"action": "finish-task", "task_id": "ab" * 16, "streaming": "duplex"}, "payload": {"input": {}}}


@pytest.mark.parametrize(("given", "hint"), [("zh", "zh"), ("zh-CN", "zh"), ("en_US", "en"), ("YUE", "yue"), (None, None), ("", None)])
def test_language_hints_are_bare_codes(given, hint):
    assert language_hint(given) == hint


def test_events_decode():
    started = parse_event('{"header": {"task_id": "t1", "event": "task-started", "attributes": {}}, "payload": {}}')
    assert (started.name, started.task_id) == ("task-started", "t1")
    partial = parse_event(json.dumps({"header": {"task_id": "t1", "event": "result-generated", "attributes": {}}, "payload": {"output": {"sentence": {"begin_time": 170, "end_time": None, "text": "好,我", "heartbeat": False, "sentence_end": False}}, "usage": None}}, ensure_ascii=False))
    assert (partial.text, partial.sentence_end, partial.heartbeat) == ("好,我", False, False)
    final = parse_event(json.dumps({"header": {"task_id": "t1", "event": "result-generated", "attributes": {}}, "payload": {"output": {"sentence": {"begin_time": 170, "end_time": 920, "text": "好,我知道了", "sentence_end": True, "words": []}}, "usage": {"duration": 3}}}))
    assert (final.text, final.sentence_end) == ("好,我知道了", True)
    beat = parse_event('{"header": {"event": "result-generated"}, "payload": {"output": {"sentence": {"text": "", "heartbeat": true, "sentence_end": false}}}}')
    assert beat.heartbeat
    done = parse_event('{"header": {"task_id": "t1", "event": "task-finished", "attributes": {}}, "payload": {"output": {}, "usage": null}}')
    assert done.name == "task-finished"
    failed = parse_event('{"header": {"task_id": "t1", "event": "task-failed", "error_code": "CLIENT_ERROR", "error_message": "request timeout after 23 seconds.", "attributes": {}}, "payload": {}}')
    assert (failed.error_code, failed.error_message) == ("CLIENT_ERROR", "request timeout after 23 seconds.")


@pytest.mark.parametrize("frame", [b"\x00\x01binary", "<html>502 Bad Gateway</html>", '{"header": {}}', '{"header": {"event": "session.created"}}', "[]", '{"header": {"event": "result-generated"}, "payload": {"output": {"sentence": "text"}}}'])
def test_anything_else_is_a_protocol_error(frame):
    with pytest.raises(EngineError) as caught:
        parse_event(frame)
    assert caught.value.reason == "protocol"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("InvalidApiKey", "auth"),
        ("AccessDenied", "auth"),
        ("Throttling.AllocationQuota", "quota"),
        ("Arrearage", "quota"),
        ("Throttling.RateQuota", "rate_limited"),
        ("InvalidParameter", "bad_audio"),
        ("InternalError", "server"),
        ("ModelNotFound", "protocol"),
    ],
)
def test_task_failed_codes_map_to_reasons(code, reason):
    assert failure_reason(code) == reason


def test_a_task_failed_error_quotes_the_vendor():
    event = parse_event('{"header": {"task_id": "t", "event": "task-failed", "error_code": "Throttling.AllocationQuota", "error_message": "Allocated quota exceeded, please increase your quota limit."}, "payload": {}}')
    error = failure(event)
    assert error.reason == "quota"
    assert str(error) == "task-failed Throttling.AllocationQuota: Allocated quota exceeded, please increase your quota limit."


def test_a_refused_handshake():
    body = b'{"code": "InvalidApiKey", "message": "Invalid API-key provided.", "request_id": "x"}'
    error = handshake_failure(401, body)
    assert (error.reason, str(error)) == ("auth", "HTTP 401 InvalidApiKey: Invalid API-key provided.")
    assert handshake_failure(403, b"Forbidden").reason == "auth"
    assert handshake_failure(429, b'{"code": "Throttling.RateQuota", "message": "Requests rate limit exceeded"}').reason == "rate_limited"
    assert handshake_failure(502, b"<html>").reason == "server"


def test_the_stand_in_refuses_what_the_docs_forbid():
    good = json.loads(run_task(new_task_id(), "paraformer-realtime-v2"))
    for path, value in ((("header", "streaming"), "out"), (("payload", "task"), "tts"), (("payload", "input"), None)):
        bad = json.loads(json.dumps(good))
        bad[path[0]][path[1]] = value
        assert check_run_task(bad), path
