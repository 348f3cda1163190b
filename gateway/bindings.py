"""Device binding (activation, protocol.md §1.5) behind a storage interface.

A device that is not bound to an owner gets a 6-digit code in its OTA answer; it speaks the code,
the owner enters it (``xiaozhi bind CODE``, later the manager's console), and the device's
``/activate`` polls turn from 202 to 200. :class:`SqliteBindingStore` keeps bindings in a SQLite
file, so they survive restarts.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Protocol


class BindingStore(Protocol):
    def is_bound(self, device_id: str) -> bool: ...

    def pending_code(self, device_id: str) -> str:
        """The activation code for an unbound device (the same one until it is used or expires)."""
        ...

    def bind(self, code: str, owner: str) -> str | None:
        """Bind the device waiting with ``code`` to ``owner``; returns its device id, or None."""
        ...

    def unbind(self, device_id: str) -> bool: ...


class SqliteBindingStore:
    """Bindings and pending codes in one SQLite file (thread-safe, one connection)."""

    def __init__(self, path: str | Path, code_ttl_s: int = 24 * 3600) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.code_ttl_s = code_ttl_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS bindings (device_id TEXT PRIMARY KEY, owner TEXT NOT NULL, bound_at REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS codes (code TEXT PRIMARY KEY, device_id TEXT UNIQUE NOT NULL, created_at REAL NOT NULL)")

    def is_bound(self, device_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM bindings WHERE device_id = ?", (device_id.lower(),)).fetchone()
        return row is not None

    def pending_code(self, device_id: str) -> str:
        device_id = device_id.lower()
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM codes WHERE created_at < ?", (now - self.code_ttl_s,))
            row = self._db.execute("SELECT code FROM codes WHERE device_id = ?", (device_id,)).fetchone()
            if row:
                return row[0]
            while True:
                code = f"{secrets.randbelow(1_000_000):06d}"
                try:
                    self._db.execute("INSERT INTO codes (code, device_id, created_at) VALUES (?, ?, ?)", (code, device_id, now))
                    return code
                except sqlite3.IntegrityError:
                    continue  # that code is taken by another device: draw again

    def bind(self, code: str, owner: str) -> str | None:
        code = code.strip()
        with self._lock:
            row = self._db.execute("SELECT device_id, created_at FROM codes WHERE code = ?", (code,)).fetchone()
            if row is None or row[1] < time.time() - self.code_ttl_s:
                return None
            device_id = row[0]
            self._db.execute("INSERT OR REPLACE INTO bindings (device_id, owner, bound_at) VALUES (?, ?, ?)", (device_id, owner, time.time()))
            self._db.execute("DELETE FROM codes WHERE code = ?", (code,))
        return device_id

    def unbind(self, device_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM bindings WHERE device_id = ?", (device_id.lower(),))
        return cursor.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
