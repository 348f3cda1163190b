"""Passwords (argon2id), bearer tokens (sign-in sessions and personal API tokens), roles."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
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


class Limiter:
    """Attempts per subject in a sliding window, counted in the database (table
    ``login_failures``), so every manager replica behind the same database counts the same.

    ``limits`` maps a key kind ("pair", "ip", "pw", "bind") to how many attempts per window.
    An attempt is written *before* it is judged and then counted with everything else in the
    window, so concurrent attempts cannot all pass a check made before any of them was
    written (at most ``limit`` of N concurrent ones get through). A blocked attempt removes
    its rows (waiting out the window ends the block); a successful one too (only failures
    count). Subjects are stored only as hashes (a failed username is often a password typed
    in the wrong box).
    """

    def __init__(self, window_s: int, limits: dict[str, int]) -> None:
        self.window_s = window_s
        self.limits = limits

    @staticmethod
    def key(kind: str, *values: str) -> str:
        return f"{kind}:{hashlib.sha256(chr(0).join(values).encode()).hexdigest()[:40]}"

    def _limit(self, key: str) -> int:
        return self.limits.get(key.split(":", 1)[0], 0)

    def begin(self, session: Session, *keys: str) -> Attempt:
        """Record an attempt; ``.blocked`` (and ``.retry_after_s``) when over a limit."""
        keys = tuple(k for k in keys if self._limit(k) > 0)
        if not keys:
            return Attempt([], 0)
        now = utcnow()
        since = now - dt.timedelta(seconds=self.window_s)
        for kind in {k.split(":", 1)[0] for k in keys}:
            session.execute(delete(LoginFailure).where(LoginFailure.subject.like(f"{kind}:%"), LoginFailure.at <= since))
        rows = [LoginFailure(subject=key, at=now) for key in keys]
        session.add_all(rows)
        session.commit()
        retry = 0
        for key in keys:
            count, oldest = session.execute(select(func.count(), func.min(LoginFailure.at)).where(LoginFailure.subject == key, LoginFailure.at > since)).one()
            if count > self._limit(key):
                retry = max(retry, int((oldest - since).total_seconds()) + 1 if oldest else self.window_s)
        attempt = Attempt([r.id for r in rows], retry)
        if attempt.blocked:
            self.forget(session, attempt)
        return attempt

    def forget(self, session: Session, attempt: Attempt) -> None:
        """Not a failure after all (it succeeded, or it was refused before being tried)."""
        if attempt.row_ids:
            session.execute(delete(LoginFailure).where(LoginFailure.id.in_(attempt.row_ids)))
            session.commit()
            attempt.row_ids = []


class Attempt:
    def __init__(self, row_ids: list[int], retry_after_s: int) -> None:
        self.row_ids = row_ids
        self.retry_after_s = retry_after_s

    @property
    def blocked(self) -> bool:
        return self.retry_after_s > 0


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[str]) -> str:
    """The client's address: the TCP peer's, unless the peer is a configured proxy; then the
    nearest address in X-Forwarded-For that is not one of the proxies (the entries further
    left were written by the client itself and prove nothing)."""
    networks = _networks(tuple(trusted))
    if not peer or not networks or not _in(peer, networks):
        return peer or "?"
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, networks):
            return hop
    return hops[0] if hops else peer


@functools.lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t.strip(), strict=False) for t in trusted if t.strip())


def _in(address: str, networks: tuple) -> bool:  # noqa: ANN001
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)
