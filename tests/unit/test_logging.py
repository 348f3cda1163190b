"""Structured logs: ids on every line, and secrets never written."""

from __future__ import annotations

import json
import logging

from shared import logging as xlog


def record(fields: dict) -> logging.LogRecord:
    rec = logging.LogRecord("t", logging.INFO, __file__, 1, "connected", None, None)
    rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_secret_fields_are_redacted_in_json_and_text() -> None:
    fields = {
        "device_id": "aa:bb",
        "password": "hunter2",
        "api_key": "sk-live-123",
        "headers": {"Authorization": "Bearer abc.def", "Accept": "*/*"},
        "servers": [{"url": "http://x", "token": "t0ken"}],
        "token": "",
    }
    with xlog.bind(session_id="s1", turn_id="t1"):
        line = xlog.JsonFormatter().format(record(fields))
        text = xlog.TextFormatter().format(record(fields))
    out = json.loads(line)
    assert out["session_id"] == "s1" and out["turn_id"] == "t1" and out["device_id"] == "aa:bb"
    for secret in ("hunter2", "sk-live-123", "abc.def", "t0ken"):
        assert secret not in line and secret not in text, secret
    assert out["headers"]["Accept"] == "*/*"
    assert out["servers"][0]["url"] == "http://x"
    assert out["password"] == xlog.REDACTED
