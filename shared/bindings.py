"""Device bindings (activation, protocol.md §1.5), shared by every gateway and the manager.

A device's identity is the pair (Device-Id, Client-Id): the MAC and the UUID the firmware keeps
in NVS. A pair that is not bound to an owner gets a 6-digit code in its OTA answer; the device
speaks it, the owner enters it (the manager's console, or ``xiaozhi bind CODE``), and the
device's ``/activate`` polls turn from 202 to 200.

Everything lives in two NATS KV buckets, so all gateways agree on every device and a gateway
that was away (restarted, cut off from NATS) reads the truth when it is back:

- ``<prefix>_bindings``, one record per MAC under ``dev.<sha256(lower-case MAC)>``: the bound
  pair and its owner, and ``not_before``, the MAC's last unbind (device tokens issued before it
  are refused; codes drawn before it are void). An unbind keeps the record, unbound, so that
  time survives. Writes are compare-and-set on the record's revision: two gateways (or a
  gateway and the manager) racing on one MAC never both win.
- ``<prefix>_codes``, the pending codes, each for ``code_ttl_s`` (the bucket's TTL):
  ``pair.<sha256(mac|client id)>`` holds the pair's code, challenge and proof state, and
  ``code.<code>`` points back to the pair. Creating ``code.<code>`` reserves the code across
  gateways. The stream holds at most ``2 * max_pending`` messages and refuses new ones when
  full (discard new), so at most ``max_pending`` codes wait at once and OTA answers 503 then.

Codes are issued per pair: asking OTA with a victim's MAC and a Client-Id of one's own yields a
code for that (phantom) pair, never the code the device is speaking. Binding is two-phase where
the manager decides: :meth:`BindingStore.bind` with ``commit=False`` says which pair waits with
the code and whether its MAC is bound to another owner, without writing; the manager checks its
own records and only then commits. A MAC bound to another pair of the same owner is replaced
(a re-flashed device has a new Client-Id); of another owner, refused (``conflict``).

NATS unreachable or a bucket missing raises :class:`StoreUnavailable`: callers answer 503 and
never guess.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("shared.bindings")

# Binding states of a (Device-Id, Client-Id) pair.
BOUND = "bound"  # this pair is bound
OTHER = "other"  # the MAC is bound, to another Client-Id
UNBOUND = "unbound"

_CAS_TRIES = 8


class StoreUnavailable(RuntimeError):
    """The binding store cannot be reached (NATS down, bucket missing, no permission)."""


@dataclass(frozen=True)
class Lookup:
    state: str
    not_before: float = 0.0  # the MAC's last unbind (epoch seconds), 0 when never
    owner: str | None = None


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
    replaced: bool = False  # the MAC was (or is, when not committed) bound to another pair of the same owner
    committed: bool = False


def mac_key(device_id: str) -> str:
    return "dev." + hashlib.sha256(device_id.strip().lower().encode()).hexdigest()


def pair_key(device_id: str, client_id: str) -> str:
    return "pair." + hashlib.sha256(f"{device_id.strip().lower()}|{client_id}".encode()).hexdigest()


def bucket_names(prefix: str = "xz") -> tuple[str, str]:
    return f"{prefix}_bindings", f"{prefix}_codes"


def _owner_differs(record: dict[str, Any], owner: str, owner_id: int | None) -> bool:
    if owner_id is not None and record.get("owner_id") is not None:
        return int(record["owner_id"]) != int(owner_id)
    return record.get("owner") != owner


async def ensure_buckets(nc: Any, prefix: str, code_ttl_s: int, max_pending: int, replicas: int = 1) -> None:
    """Make both buckets where missing (``xiaozhi nats-setup`` as the admin; a service user
    may not, and its refused request is not answered: the caller bounds the wait), and keep the
    codes stream's size limit at ``2 * max_pending`` messages."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError, NotFoundError

    js = nc.jetstream()
    bindings, codes = bucket_names(prefix)
    try:
        await js.key_value(bindings)
    except (BucketNotFoundError, NotFoundError):
        await js.create_key_value(config=KeyValueConfig(bucket=bindings, history=1, replicas=replicas))
        log.info("KV bucket created", extra={"fields": {"bucket": bindings, "replicas": replicas}})
    try:
        await js.key_value(codes)
    except (BucketNotFoundError, NotFoundError):
        await js.create_key_value(config=KeyValueConfig(bucket=codes, history=1, ttl=float(code_ttl_s), replicas=replicas))
        log.info("KV bucket created", extra={"fields": {"bucket": codes, "ttl_s": code_ttl_s, "replicas": replicas}})
    stream = f"KV_{codes}"
    info = await js.stream_info(stream)
    limit = 2 * max(1, min(max_pending, 100_000))
    config = info.config
    if config.max_msgs != limit or (config.max_age or 0) != float(code_ttl_s):
        config.max_msgs = limit
        config.max_age = float(code_ttl_s)
        await js.update_stream(config)
        log.info("codes bucket limits set", extra={"fields": {"bucket": codes, "max_msgs": limit, "ttl_s": code_ttl_s}})


class BindingStore:
    """Bindings and pending codes in NATS KV (see the module's docstring). ``codes=False``: the
    bindings bucket only (the manager, which unbinds but issues no codes)."""

    def __init__(self, nc: Any, prefix: str = "xz", code_ttl_s: int = 600, max_pending: int = 10000, timeout_s: float = 3.0) -> None:
        self.nc = nc
        self.bindings_bucket, self.codes_bucket = bucket_names(prefix)
        self.code_ttl_s = code_ttl_s
        # Codes are drawn from 10^6: keep the space sparse so a draw almost never collides.
        self.max_pending = max(1, min(max_pending, 100_000))
        self.timeout_s = timeout_s
        self._kv: Any = None
        self._codes: Any = None

    # ------------------------------------------------------------------ plumbing

    async def _bucket(self, name: str) -> Any:
        try:
            return await asyncio.wait_for(self.nc.jetstream().key_value(name), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - missing bucket, NATS down, refused
            raise StoreUnavailable(f"KV bucket {name}: {type(exc).__name__}: {exc}") from exc

    async def _bindings(self) -> Any:
        if self._kv is None:
            self._kv = await self._bucket(self.bindings_bucket)
        return self._kv

    async def _codes_kv(self) -> Any:
        if self._codes is None:
            self._codes = await self._bucket(self.codes_bucket)
        return self._codes

    async def _get(self, kv: Any, key: str) -> tuple[dict[str, Any] | None, int]:
        """(value, revision); (None, revision of the delete marker or 0) when absent."""
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            entry = await asyncio.wait_for(kv._get(key), self.timeout_s)  # _get: tells deleted (revision) from never written
        except KeyDeletedError as err:
            return None, err.entry.revision if err.entry is not None else 0
        except KeyNotFoundError:
            return None, 0
        except Exception as exc:  # noqa: BLE001
            raise StoreUnavailable(f"{key}: {type(exc).__name__}: {exc}") from exc
        try:
            value = json.loads(entry.value)
        except (ValueError, TypeError):
            value = None
        return (value if isinstance(value, dict) else None), entry.revision

    async def _write(self, kv: Any, key: str, value: dict[str, Any], last: int) -> bool:
        """Compare-and-set: False when the record changed since ``last`` (0: never written)."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            await asyncio.wait_for(kv.update(key, json.dumps(value).encode(), last=last), self.timeout_s)
            return True
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:  # noqa: BLE001
            raise StoreUnavailable(f"{key}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ reading

    async def record(self, device_id: str) -> dict[str, Any] | None:
        value, _ = await self._get(await self._bindings(), mac_key(device_id))
        return value

    async def lookup(self, device_id: str, client_id: str) -> Lookup:
        value = await self.record(device_id)
        if value is None:
            return Lookup(UNBOUND)
        not_before = float(value.get("not_before") or 0.0)
        if not value.get("bound"):
            return Lookup(UNBOUND, not_before)
        state = BOUND if value.get("client_id") and value.get("client_id") == client_id else OTHER
        return Lookup(state, not_before, value.get("owner"))

    # ------------------------------------------------------------------ codes

    def _fresh(self, record: dict[str, Any] | None, not_before: float, now: float) -> bool:
        if record is None:
            return False
        created = float(record.get("created_at") or 0.0)
        return created >= now - self.code_ttl_s and created >= not_before

    @staticmethod
    def _pending(record: dict[str, Any]) -> Pending:
        return Pending(str(record["code"]), str(record["challenge"]), float(record["created_at"]), record.get("serial"), bool(record.get("verified")) or not record.get("needs_proof"))

    async def pending(self, device_id: str, client_id: str, not_before: float = 0.0) -> Pending | None:
        """The pair's waiting code, if any (drawn after the MAC's last unbind)."""
        record, _ = await self._get(await self._codes_kv(), pair_key(device_id, client_id))
        return self._pending(record) if self._fresh(record, not_before, time.time()) else None  # type: ignore[arg-type]

    async def pending_code(self, device_id: str, client_id: str, serial: str | None = None, needs_proof: bool = False, not_before: float = 0.0) -> Pending | None:
        """The activation code for an unbound pair (the same one until it is used or expires);
        None when ``max_pending`` codes are waiting."""
        from nats.js.errors import APIError, KeyWrongLastSequenceError

        codes = await self._codes_kv()
        key = pair_key(device_id, client_id)
        now = time.time()
        record, revision = await self._get(codes, key)
        if self._fresh(record, not_before, now):
            return self._pending(record)  # type: ignore[arg-type]
        challenge = secrets.token_hex(16)
        for _ in range(50):  # the space is at most 20% full: a collision is rare, 50 in a row never
            code = f"{secrets.randbelow(1_000_000):06d}"
            try:
                await asyncio.wait_for(codes.create(f"code.{code}", json.dumps({"pair": key}).encode()), self.timeout_s)
            except KeyWrongLastSequenceError:
                continue  # another pair waits with that code: draw again
            except APIError as exc:
                if _full(exc):
                    return None
                raise StoreUnavailable(f"code: {exc}") from exc
            except Exception as exc:  # noqa: BLE001
                raise StoreUnavailable(f"code: {type(exc).__name__}: {exc}") from exc
            value = {
                "code": code, "device_id": device_id.strip().lower(), "client_id": client_id, "challenge": challenge,
                "created_at": now, "serial": serial, "needs_proof": needs_proof, "verified": False,
            }
            try:
                written = await self._write(codes, key, value, revision)
            except StoreUnavailable as exc:
                if isinstance(exc.__cause__, APIError) and _full(exc.__cause__):
                    return None
                raise
            if not written:
                # Another gateway drew a code for this pair at the same moment: that one holds.
                record, _ = await self._get(codes, key)
                return self._pending(record) if self._fresh(record, not_before, now) else None  # type: ignore[arg-type]
            return Pending(code, challenge, now, serial, not needs_proof)
        return None

    async def mark_verified(self, device_id: str, client_id: str) -> bool:
        """The pair answered its challenge with a valid HMAC: its code may now be bound."""
        codes = await self._codes_kv()
        key = pair_key(device_id, client_id)
        for _ in range(_CAS_TRIES):
            record, revision = await self._get(codes, key)
            if record is None:
                return False
            if await self._write(codes, key, {**record, "verified": True}, revision):
                return True
        return False

    # ------------------------------------------------------------------ binding

    async def bind(self, code: str, owner: str, owner_id: int | None = None, commit: bool = True) -> BindResult | None:
        """The pair waiting with ``code``, bound to ``owner`` when ``commit`` (else only
        checked); None when no pair waits with that code (or it has not proved its chip key)."""
        code = code.strip()
        if not (len(code) == 6 and code.isdigit()):
            return None
        codes = await self._codes_kv()
        pointer, _ = await self._get(codes, f"code.{code}")
        if pointer is None or not isinstance(pointer.get("pair"), str):
            return None
        pair, _ = await self._get(codes, pointer["pair"])
        now = time.time()
        if pair is None or pair.get("code") != code or not self._fresh(pair, 0.0, now):
            return None
        if pair.get("needs_proof") and not pair.get("verified"):
            return None  # the device has not proved its chip key yet
        device_id, client_id = str(pair["device_id"]), str(pair["client_id"])
        kv = await self._bindings()
        key = mac_key(device_id)
        for _ in range(_CAS_TRIES):
            current, revision = await self._get(kv, key)
            current = current or {}
            if float(pair.get("created_at") or 0.0) < float(current.get("not_before") or 0.0):
                return None  # drawn before the MAC's last unbind: void
            bound = bool(current.get("bound"))
            if bound and _owner_differs(current, owner, owner_id):
                return BindResult(device_id, client_id, conflict=True)
            replaced = bound and current.get("client_id") != client_id
            if not commit:
                return BindResult(device_id, client_id, replaced=replaced)
            value = {
                "device_id": device_id, "client_id": client_id, "bound": True, "owner": owner, "owner_id": owner_id,
                "bound_at": now, "not_before": float(current.get("not_before") or 0.0),
            }
            if await self._write(kv, key, value, revision):
                await self._forget_code(codes, code, pointer["pair"])
                return BindResult(device_id, client_id, replaced=replaced, committed=True)
        raise StoreUnavailable(f"binding {key}: too many concurrent writers")

    async def _forget_code(self, codes: Any, code: str, pair: str) -> None:
        """A used code leaves no message behind (a purge, not a delete marker), so its place
        under the ``max_pending`` limit is free at once."""
        js = self.nc.jetstream()
        for key in (pair, f"code.{code}"):
            try:
                await asyncio.wait_for(js.purge_stream(f"KV_{self.codes_bucket}", subject=f"$KV.{self.codes_bucket}.{key}"), self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - it expires with the bucket's TTL anyway
                log.debug("used code not purged: %s", exc)
                try:
                    await asyncio.wait_for(codes.delete(key), self.timeout_s)
                except Exception:  # noqa: BLE001
                    pass

    async def unbind(self, device_id: str, at: float | None = None) -> bool:
        """Unbind the MAC everywhere: tokens issued before ``at`` (now) are refused and codes
        drawn before it are void. True when it was bound."""
        at = time.time() if at is None else at
        kv = await self._bindings()
        key = mac_key(device_id)
        for _ in range(_CAS_TRIES):
            current, revision = await self._get(kv, key)
            current = current or {}
            value = {"device_id": device_id.strip().lower(), "bound": False, "not_before": max(float(current.get("not_before") or 0.0), at)}
            if await self._write(kv, key, value, revision):
                return bool(current.get("bound"))
        raise StoreUnavailable(f"unbinding {key}: too many concurrent writers")

    async def import_legacy(self, path: str) -> int:
        """Bindings and revocations from the SQLite file earlier versions kept per gateway
        (``gateway.binding_db``); records already in the store win. The number imported."""
        import sqlite3

        def read() -> tuple[list[tuple], list[tuple]]:
            db = sqlite3.connect(path)
            try:
                columns = {row[1] for row in db.execute("PRAGMA table_info(bindings)")}
                client = "client_id" if "client_id" in columns else "NULL"
                rows = list(db.execute(f"SELECT device_id, owner, bound_at, {client} FROM bindings")) if columns else []
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                revocations = list(db.execute("SELECT device_id, not_before FROM revocations")) if "revocations" in tables else []
                return rows, revocations
            finally:
                db.close()

        rows, revocations = await asyncio.to_thread(read)
        not_before = {str(d).lower(): float(t) for d, t in revocations}
        kv = await self._bindings()
        imported = 0
        seen = set()
        for device_id, owner, bound_at, client_id in rows:
            device_id = str(device_id).lower()
            seen.add(device_id)
            value = {
                # A binding without its pair (made before pairs were recorded): the device is
                # asked to activate again; its owner's code replaces it.
                "device_id": device_id, "client_id": client_id, "bound": True, "owner": owner, "owner_id": None,
                "bound_at": float(bound_at), "not_before": not_before.get(device_id, 0.0),
            }
            if await self._write(kv, mac_key(device_id), value, 0):
                imported += 1
        for device_id, at in not_before.items():
            if device_id not in seen and await self._write(kv, mac_key(device_id), {"device_id": device_id, "bound": False, "not_before": at}, 0):
                imported += 1
        return imported


def _full(exc: Exception) -> bool:
    """JetStream refused the message: the codes stream holds its maximum (discard new)."""
    code = getattr(exc, "err_code", None)
    return code in (10077, 10047) or "maximum messages" in str(exc).lower()
