"""Structured logging: one JSON object per line, stamped with the service, session and turn.

Use :func:`bind` (a context manager) around work on a session or turn; every log line inside
it, including lines from awaited coroutines, carries those ids. Extra fields go in
``log.info("msg", extra={"fields": {...}})`` or through :func:`event`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from typing import Any, Iterator

_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)
_turn: contextvars.ContextVar[str | None] = contextvars.ContextVar("turn_id", default=None)
_service = {"name": "xiaozhi"}


@contextlib.contextmanager
def bind(session_id: str | None = None, turn_id: str | None = None) -> Iterator[None]:
    """Stamp every log line inside the block with this session and turn."""
    tokens = []
    if session_id is not None:
        tokens.append((_session, _session.set(session_id)))
    if turn_id is not None:
        tokens.append((_turn, _turn.set(turn_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def set_session(session_id: str | None) -> None:
    """Bind the session for the rest of the current task."""
    _session.set(session_id)


def set_turn(turn_id: str | None) -> None:
    """Bind the turn for the rest of the current task."""
    _turn.set(turn_id)


# Field names whose values are never written to a log, whoever passes them (and nested).
_SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "cookie", "credential", "private_key")
REDACTED = "[redacted]"


# Credentials inside a URL: scheme://user:password@host or scheme://token@host (NATS URLs with
# their password, a database URL...).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:,]*)(?P<password>:[^\s/@,]*)?@")


def redact_url(text: str) -> str:
    """``text`` with the password (or the token) of every URL in it replaced:
    ``nats://gateway:s3cret@nats:4222`` -> ``nats://gateway:[redacted]@nats:4222``."""
    if "@" not in text or "://" not in text:
        return text

    def replace(match: re.Match) -> str:
        if match.group("password") is not None:
            return f"{match.group('scheme')}{match.group('user')}:{REDACTED}@"
        return f"{match.group('scheme')}{REDACTED}@"

    return _URL_USERINFO.sub(replace, text)


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of log fields with secret-looking keys' values replaced, and credentials inside
    URLs removed."""
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and any(w in k.lower() for w in _SECRET_WORDS) and v not in (None, "") else redact(v, depth + 1)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, depth + 1) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": _service["name"],
            "logger": record.name,
            "msg": redact_url(record.getMessage()),
        }
        session = getattr(record, "session_id", None) or _session.get()
        turn = getattr(record, "turn_id", None) or _turn.get()
        if session:
            out["session_id"] = session
        if turn:
            out["turn_id"] = turn
        fields = getattr(record, "fields", None)
        if fields:
            out.update(redact(fields))
        if record.exc_info:
            out["exc"] = redact_url(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the same ids."""

    def format(self, record: logging.LogRecord) -> str:
        session = getattr(record, "session_id", None) or _session.get()
        turn = getattr(record, "turn_id", None) or _turn.get()
        ids = ""
        if session:
            ids += f" s={session[:8]}"
        if turn:
            ids += f" t={turn[:8]}"
        fields = redact(getattr(record, "fields", None) or {})
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        line = (
            f"{time.strftime('%H:%M:%S', time.localtime(record.created))}.{int(record.msecs):03d} "
            f"{record.levelname[0]} {_service['name']}{ids} {redact_url(record.getMessage())}{extra}"
        )
        if record.exc_info:
            line += "\n" + redact_url(self.formatException(record.exc_info))
        return line


def setup(service: str, level: str = "INFO", json_lines: bool = True) -> None:
    """Configure the root logger for a service process."""
    _service["name"] = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "websockets", "aiohttp.access", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    logger.log(level, msg, extra={"fields": fields})
