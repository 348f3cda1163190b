"""Device binding (activation, protocol.md §1.5) behind a storage interface.

A device's identity is the pair (Device-Id, Client-Id): the MAC and the UUID the firmware keeps
in NVS. A pair that is not bound to an owner gets a 6-digit code in its OTA answer; the device
speaks it, the owner enters it (the manager's console, or ``xiaozhi bind CODE``), and the
device's ``/activate`` polls turn from 202 to 200.

Codes are issued per pair: asking OTA with a victim's MAC and a Client-Id of one's own yields a
code for that (phantom) pair, never the code the device is speaking, and binding it does not
make the device's own pair bound. Each pending code has a random challenge (the nonce an
Activation-Version 2 device signs with its eFuse key). Codes expire after ``code_ttl_s`` and at
most ``max_pending`` wait at once: when full, expired ones are removed and, if still full, no
code is issued (the caller answers 503) -- never a loop.

A binding records the pair. Binding a code whose MAC is bound to another pair replaces that
binding when the owner is the same (a re-flashed device has a new Client-Id) and is refused
otherwise. An unbind removes the binding and the MAC's pending codes and records a not-before
time: device tokens issued before it are refused.

:class:`SqliteBindingStore` keeps all of it in a SQLite file (mode 0600), so it survives
restarts. Its methods block: the gateway calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Binding states of a (Device-Id, Client-Id) pair.
BOUND = "bound"  # this pair is bound
OTHER = "other"  # the MAC is bound, to another Client-Id
UNBOUND = "unbound"


@dataclass(frozen=True)
class Pending:
    code: str
    challenge: str
    created_at: float
    serial: str | None = None
    verified: bool = False


@dataclass(frozen=True)
class BindResult:
    device_id: str
    client_id: str
    conflict: bool = False  # the MAC is bound to another owner: nothing changed
    replaced: bool = False  # the MAC was bound to another pair of the same owner


class BindingStore(Protocol):
    def state(self, device_id: str, client_id: str) -> str: ...

    def is_bound(self, device_id: str) -> bool: ...

    def pending_code(self, device_id: str, client_id: str, serial: str | None = None, needs_proof: bool = False) -> Pending | None:
        """The activation code for an unbound pair (the same one until it is used or expires);
        None when ``max_pending`` codes are waiting."""
        ...

    def pending(self, device_id: str, client_id: str) -> Pending | None: ...

    def mark_verified(self, device_id: str, client_id: str) -> bool: ...

    def bind(self, code: str, owner: str) -> BindResult | None:
        """Bind the pair waiting with ``code`` to ``owner``; None when no such code."""
        ...

    def unbind(self, device_id: str, at: float | None = None) -> bool: ...

    def revocations(self) -> dict[str, float]: ...


def _key(device_id: str) -> str:
    return device_id.lower()


class SqliteBindingStore:
    """Bindings, pending codes and revocations in one SQLite file (thread-safe, one connection)."""

    def __init__(self, path: str | Path, code_ttl_s: int = 600, max_pending: int = 10000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.code_ttl_s = code_ttl_s
        # Codes are drawn from 10^6: keep the space sparse so a draw almost never collides.
        self.max_pending = max(1, min(max_pending, 100_000))
        # Owner-only: the file names every device and who owns it.
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS bindings (device_id TEXT PRIMARY KEY, owner TEXT NOT NULL, bound_at REAL NOT NULL, client_id TEXT)")
        if "client_id" not in self._columns("bindings"):
            # Bindings made before pairs were recorded: their pair is unknown (NULL), so the
            # device is asked to activate again; its owner's code replaces the old binding.
            db.execute("ALTER TABLE bindings ADD COLUMN client_id TEXT")
        if "challenge" not in self._columns("codes"):
            db.execute("DROP TABLE IF EXISTS codes")  # short-lived codes of the old layout
        db.execute(
            "CREATE TABLE IF NOT EXISTS codes (code TEXT PRIMARY KEY, device_id TEXT NOT NULL, client_id TEXT NOT NULL,"
            " challenge TEXT NOT NULL, created_at REAL NOT NULL, serial TEXT, needs_proof INTEGER NOT NULL DEFAULT 0,"
            " verified INTEGER NOT NULL DEFAULT 0, UNIQUE (device_id, client_id))"
        )
        db.execute("CREATE INDEX IF NOT EXISTS codes_created ON codes (created_at)")
        db.execute("CREATE TABLE IF NOT EXISTS revocations (device_id TEXT PRIMARY KEY, not_before REAL NOT NULL)")

    # ------------------------------------------------------------------ reading

    def state(self, device_id: str, client_id: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT client_id FROM bindings WHERE device_id = ?", (_key(device_id),)).fetchone()
        if row is None:
            return UNBOUND
        return BOUND if row[0] is not None and row[0] == client_id else OTHER

    def is_bound(self, device_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM bindings WHERE device_id = ?", (_key(device_id),)).fetchone()
        return row is not None

    def binding(self, device_id: str) -> tuple[str | None, str] | None:
        """(client id, owner) of the MAC's binding, or None."""
        with self._lock:
            row = self._db.execute("SELECT client_id, owner FROM bindings WHERE device_id = ?", (_key(device_id),)).fetchone()
        return (row[0], row[1]) if row else None

    def revocations(self) -> dict[str, float]:
        with self._lock:
            return {d: t for d, t in self._db.execute("SELECT device_id, not_before FROM revocations")}

    def pending_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM codes").fetchone()[0]

    # ------------------------------------------------------------------ codes

    def _expire(self, now: float) -> None:
        self._db.execute("DELETE FROM codes WHERE created_at < ?", (now - self.code_ttl_s,))

    def _pending_row(self, device_id: str, client_id: str, now: float) -> Pending | None:
        row = self._db.execute(
            "SELECT code, challenge, created_at, serial, needs_proof, verified FROM codes WHERE device_id = ? AND client_id = ? AND created_at >= ?",
            (device_id, client_id, now - self.code_ttl_s),
        ).fetchone()
        if row is None:
            return None
        return Pending(row[0], row[1], row[2], row[3], bool(row[5]) or not row[4])

    def pending_code(self, device_id: str, client_id: str, serial: str | None = None, needs_proof: bool = False) -> Pending | None:
        device_id = _key(device_id)
        now = time.time()
        with self._lock:
            found = self._pending_row(device_id, client_id, now)
            if found is not None:
                return found
            count = self._db.execute("SELECT COUNT(*) FROM codes").fetchone()[0]
            if count >= self.max_pending:
                self._expire(now)
                count = self._db.execute("SELECT COUNT(*) FROM codes").fetchone()[0]
                if count >= self.max_pending:
                    return None
            # An expired row of this pair would block the insert (UNIQUE pair).
            self._db.execute("DELETE FROM codes WHERE device_id = ? AND client_id = ?", (device_id, client_id))
            challenge = secrets.token_hex(16)
            for _ in range(50):  # the space is at most 10% full: a collision is rare, 50 in a row never
                code = f"{secrets.randbelow(1_000_000):06d}"
                try:
                    self._db.execute(
                        "INSERT INTO codes (code, device_id, client_id, challenge, created_at, serial, needs_proof) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (code, device_id, client_id, challenge, now, serial, int(needs_proof)),
                    )
                    return Pending(code, challenge, now, serial, not needs_proof)
                except sqlite3.IntegrityError:
                    continue  # that code is taken by another pair: draw again
            return None

    def pending(self, device_id: str, client_id: str) -> Pending | None:
        with self._lock:
            return self._pending_row(_key(device_id), client_id, time.time())

    def mark_verified(self, device_id: str, client_id: str) -> bool:
        """The pair answered its challenge with a valid HMAC: its code may now be bound."""
        with self._lock:
            cursor = self._db.execute("UPDATE codes SET verified = 1 WHERE device_id = ? AND client_id = ?", (_key(device_id), client_id))
        return cursor.rowcount > 0

    # ------------------------------------------------------------------ binding

    def bind(self, code: str, owner: str) -> BindResult | None:
        code = code.strip()
        now = time.time()
        with self._lock:
            row = self._db.execute("SELECT device_id, client_id, created_at, needs_proof, verified FROM codes WHERE code = ?", (code,)).fetchone()
            if row is None or row[2] < now - self.code_ttl_s:
                return None
            device_id, client_id, _, needs_proof, verified = row
            if needs_proof and not verified:
                return None  # the device has not proved its chip key yet
            current = self._db.execute("SELECT client_id, owner FROM bindings WHERE device_id = ?", (device_id,)).fetchone()
            replaced = False
            if current is not None and current[0] != client_id:
                if current[1] != owner:
                    return BindResult(device_id, client_id, conflict=True)
                replaced = True
            self._db.execute("BEGIN")
            try:
                self._db.execute("INSERT OR REPLACE INTO bindings (device_id, owner, bound_at, client_id) VALUES (?, ?, ?, ?)", (device_id, owner, now, client_id))
                self._db.execute("DELETE FROM codes WHERE device_id = ? AND client_id = ?", (device_id, client_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return BindResult(device_id, client_id, replaced=replaced)

    def unbind(self, device_id: str, at: float | None = None) -> bool:
        """Remove the binding and the MAC's pending codes; tokens issued before ``at`` (now)
        are revoked. True when there was a binding."""
        device_id = _key(device_id)
        at = time.time() if at is None else at
        with self._lock:
            cursor = self._db.execute("DELETE FROM bindings WHERE device_id = ?", (device_id,))
            removed = cursor.rowcount > 0
            # Codes handed out for the MAC meanwhile (phantom pairs waiting for the unbind) go too.
            self._db.execute("DELETE FROM codes WHERE device_id = ?", (device_id,))
            self._db.execute(
                "INSERT INTO revocations (device_id, not_before) VALUES (?, ?) ON CONFLICT(device_id) DO UPDATE SET not_before = MAX(not_before, excluded.not_before)",
                (device_id, at),
            )
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()
