"""Passwords (argon2id), bearer tokens (sign-in sessions and personal API tokens), roles."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from manager.models import ApiToken, LoginFailure, User, utcnow

_hasher = PasswordHasher()
TOKEN_PREFIX = "xzm_"
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """Constant work whether or not the user exists (no user-enumeration by timing)."""
    stored = user.password_hash if user is not None else _DUMMY_HASH
    try:
        ok = _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False
    return ok and user is not None


_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(user: User, kind: str, name: str = "", ttl_s: int | None = None) -> tuple[str, ApiToken]:
    """A fresh token (returned once) and its row (which keeps only the digest)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = utcnow() + dt.timedelta(seconds=ttl_s) if ttl_s else None
    row = ApiToken(user_id=user.id, kind=kind, name=name, token_hash=digest(token), prefix=token[:10], expires_at=expires)
    return token, row


class LoginLimiter:
    """Failed sign-ins in a sliding minute: ``per_minute`` per username, five times that per
    address (several people may sign in from behind one NAT).

    Kept in the database (table ``login_failures``, rows older than a minute deleted), so every
    manager replica behind the same database counts the same failures. Usernames and addresses
    are stored only as hashes (a failed username is often a password typed in the wrong box).
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute

    @staticmethod
    def key(kind: str, value: str) -> str:
        return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()[:40]}"

    def _limit(self, key: str) -> int:
        return self.per_minute * (5 if key.startswith("ip:") else 1)

    def blocked(self, session: Session, *keys: str) -> bool:
        if self.per_minute <= 0:
            return False
        since = utcnow() - dt.timedelta(seconds=60)
        for key in keys:
            count = session.execute(select(func.count()).select_from(LoginFailure).where(LoginFailure.subject == key, LoginFailure.at > since)).scalar_one()
            if count >= self._limit(key):
                return True
        return False

    def failed(self, session: Session, *keys: str) -> None:
        now = utcnow()
        session.execute(delete(LoginFailure).where(LoginFailure.at <= now - dt.timedelta(seconds=60)))
        session.add_all([LoginFailure(subject=key, at=now) for key in keys])
        session.commit()
