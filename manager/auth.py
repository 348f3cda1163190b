"""Passwords (argon2id), bearer tokens (sign-in sessions and personal API tokens), roles."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from manager.models import ApiToken, User, utcnow

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
    address (several people may sign in from behind one NAT)."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._fails: dict[str, deque[float]] = defaultdict(deque)

    def _limit(self, key: str) -> int:
        return self.per_minute * (5 if key.startswith("ip:") else 1)

    def blocked(self, *keys: str) -> bool:
        if self.per_minute <= 0:
            return False
        now = time.monotonic()
        for key in keys:
            fails = self._fails.get(key)
            while fails and fails[0] < now - 60:
                fails.popleft()
            if fails is not None and not fails:
                del self._fails[key]
            elif fails and len(fails) >= self._limit(key):
                return True
        return False

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            self._fails[key].append(now)
