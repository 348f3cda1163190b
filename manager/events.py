"""What the pipeline tells the manager: devices seen (OTA, connected, disconnected) and the
texts of finished turns. Kept only for bound devices; anything else is ignored."""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from manager.models import ChatTurn, Device, utcnow
from shared.metrics import DROPPED, ERRORS

log = logging.getLogger("manager.events")
# Object names the ASR writes: <turn id>.ogg.
SAFE_AUDIO = re.compile(r"^[A-Za-z0-9_-]{1,64}\.ogg$")


def _when(event: dict[str, Any]) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(event["at"]), dt.timezone.utc).replace(tzinfo=None)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return utcnow()


def record_seen(sessions: sessionmaker[Session], device_id: str, event: dict[str, Any]) -> bool:
    """Last seen, board and firmware version of a bound device; False when not bound."""
    try:
        with sessions() as db:
            device = db.execute(select(Device).where(Device.device_id == device_id)).scalar_one_or_none()
            if device is None:
                return False
            device.last_seen = max(device.last_seen or _when(event), _when(event))
            for field, limit in (("board", 100), ("firmware_version", 64)):
                value = event.get(field)
                if isinstance(value, str) and value:
                    setattr(device, field, value[:limit])
            db.commit()
            return True
    except Exception as exc:  # noqa: BLE001 - a database hiccup loses one "seen", nothing more
        ERRORS.labels("manager", "seen_store").inc()
        log.warning("could not record a device as seen: %s", exc)
        return False


def _prune(db: Session, device_id: str, keep: int) -> None:
    """Keep the newest ``keep`` lines of a device's history (an id bound, not LIMIT in a
    subquery, which MySQL and MariaDB refuse)."""
    if keep <= 0:
        return
    oldest_kept = db.execute(
        select(ChatTurn.id).where(ChatTurn.device_id == device_id).order_by(ChatTurn.id.desc()).offset(keep - 1).limit(1)
    ).scalar_one_or_none()
    if oldest_kept is not None:
        db.execute(delete(ChatTurn).where(ChatTurn.device_id == device_id, ChatTurn.id < oldest_kept))
        db.commit()


def record_history(sessions: sessionmaker[Session], device_id: str, event: dict[str, Any], keep: int = 2000) -> bool:
    """A finished turn's user text and reply into the chat history of a bound device."""
    user, assistant = event.get("user"), event.get("assistant")
    session_id, turn_id = str(event.get("session_id") or "")[:64], (str(event["turn_id"])[:64] if event.get("turn_id") else None)
    if not session_id or not isinstance(user, str) or not isinstance(assistant, str):
        DROPPED.labels("manager", "bad_history_event").inc()
        return False
    at = _when(event)
    try:
        with sessions() as db:
            if db.execute(select(Device.id).where(Device.device_id == device_id)).scalar_one_or_none() is None:
                return False
            audio = event.get("audio") if isinstance(event.get("audio"), str) and SAFE_AUDIO.match(event["audio"]) else None
            for role, text in (("user", user), ("assistant", assistant)):
                if text:
                    db.add(ChatTurn(device_id=device_id, session_id=session_id, turn_id=turn_id, role=role, text=text[:8000], created_at=at, audio_path=audio if role == "user" else None))
            db.commit()
            _prune(db, device_id, keep)
            return True
    except Exception as exc:  # noqa: BLE001
        ERRORS.labels("manager", "history_store").inc()
        log.warning("could not store chat history: %s", exc)
        return False
