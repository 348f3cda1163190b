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


def test_credentials_inside_urls_are_redacted_in_messages_fields_and_tracebacks() -> None:
    url = "nats://gateway:hunter2pass@nats-0:4222,nats://gateway:hunter2pass@nats-1:4222"
    assert xlog.redact_url(url) == "nats://gateway:[redacted]@nats-0:4222,nats://gateway:[redacted]@nats-1:4222"
    assert xlog.redact_url("tls://s3cr3ttoken@nats:4222") == "tls://[redacted]@nats:4222"
    assert xlog.redact_url("mysql+pymysql://root:pw@127.0.0.1:3306/db") == "mysql+pymysql://root:[redacted]@127.0.0.1:3306/db"
    # What has no credentials is left alone (an e-mail address is no URL).
    for plain in ("nats://nats:4222", "http://x/a@b", "mail me at a@b.c"):
        assert xlog.redact_url(plain) == plain
    rec = logging.LogRecord("t", logging.WARNING, __file__, 1, "cannot reach %s", ("nats://llm:hunter2pass@h:1",), None)
    rec.fields = {"url": url, "servers": [url]}  # type: ignore[attr-defined]
    try:
        raise ConnectionError(f"refused: {url}")
    except ConnectionError:
        import sys

        rec.exc_info = sys.exc_info()
    for line in (xlog.JsonFormatter().format(rec), xlog.TextFormatter().format(rec)):
        assert "hunter2pass" not in line, line
        assert "gateway:[redacted]@nats-0" in line and "llm:[redacted]@h" in line
