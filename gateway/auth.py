"""Device authentication (protocol.md §2.4) and the vision capability token (§5.7).

Device tokens use the reference server's format, so tokens from its manager or MQTT gateway
interoperate when they share the key: ``<sig>.<ts>`` where ``ts`` is the issue time in Unix
seconds and ``sig`` is base64url-without-padding(HMAC-SHA256(key, "<Client-Id>|<Device-Id>|<ts>")).
The token holds no ids: it is bound to the connection's Client-Id and Device-Id headers.

Vision tokens are shorter-lived and bound to one device: ``v1.<device b64>.<exp>.<sig>``.
Everything here is pure: the caller passes the current time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field

# A Device-Id as OTA accepts it (gateway.ota.DEVICE_ID), lower-cased.
_MAC = re.compile(r"[a-z0-9:._-]{1,64}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, message: str) -> bytes:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).digest()


def issue_device_token(key: str, client_id: str, device_id: str, now: int) -> str:
    """A device token in the reference server's ``sig.ts`` format."""
    return f"{_b64(_mac(key, f'{client_id}|{device_id}|{now}'))}.{now}"


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    reason: str = ""
    # When the token was issued (Unix seconds); None when no token was checked (allow-list).
    issued_at: int | None = None
    # A vision token's session (v2): valid while that session is open.
    session_id: str | None = None


def strip_bearer(authorization: str) -> str | None:
    """The token inside ``Authorization: Bearer <token>``, or None when the scheme is not Bearer."""
    value = authorization.strip()
    if value[:7].lower() != "bearer ":
        return None
    return value[7:].strip()


def allow_listed(allowed_devices, device_id: str) -> bool:
    """A Device-Id on the allow-list (compared case-insensitively: MACs come in both cases)."""
    return bool(device_id) and device_id.lower() in {d.lower() for d in allowed_devices}


def verify_device(
    key: str,
    authorization: str,
    client_id: str,
    device_id: str,
    now: int,
    expire_seconds: int,
    allowed_devices: frozenset[str] = frozenset(),
    not_before: float | None = None,
) -> AuthResult:
    """Check a device's Authorization header value against its Client-Id and Device-Id.

    ``not_before``: tokens issued before this time (the device's last unbind) are refused."""
    if allow_listed(allowed_devices, device_id):
        return AuthResult(True, "allow-listed")
    if not authorization:
        return AuthResult(False, "missing token")
    token = strip_bearer(authorization)
    if token is None:
        return AuthResult(False, "not a Bearer token")
    sig, _, ts_text = token.rpartition(".")
    if not sig or not ts_text.isdigit():
        return AuthResult(False, "malformed token")
    ts = int(ts_text)
    expected = _b64(_mac(key, f"{client_id}|{device_id}|{ts}"))
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return AuthResult(False, "bad signature")
    if ts > now + 300:
        return AuthResult(False, "token from the future")
    if now - ts > expire_seconds:
        return AuthResult(False, "token expired")
    if not_before is not None and ts < not_before:
        # Issued before the device was unbound: revoked.
        return AuthResult(False, "token revoked")
    return AuthResult(True, issued_at=ts)


@dataclass(frozen=True)
class DeviceKeys:
    """Per-chip HMAC keys by serial number, and the chip's MAC (Device-Id) where the file names it.

    A listed MAC ties the key to the device: its codes need that chip's proof whatever headers
    a request carries (see ``gateway.ota.chip_proof``)."""

    keys: dict[str, bytes] = field(default_factory=dict)
    # Lower-case MAC -> serial, for the entries that name one.
    macs: dict[str, str] = field(default_factory=dict)
    _mac_of: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._mac_of.update({serial: mac for mac, serial in self.macs.items()})

    def serial_of(self, device_id: str) -> str | None:
        """The serial of the chip listed with this MAC (compared case-insensitively), or None."""
        return self.macs.get(device_id.lower())

    def mac_of(self, serial: str) -> str | None:
        """The MAC listed with this serial, or None (not listed, or listed without one)."""
        return self._mac_of.get(serial)

    def __len__(self) -> int:
        return len(self.keys)


def load_device_keys(path: str | None) -> DeviceKeys:
    """Per-chip HMAC keys from a JSON or YAML file (None: none). Each entry is either
    ``"<serial>": "<hex key>"`` or ``"<serial>": {"key": "<hex key>", "mac": "<Device-Id>"}``.

    A missing file or a bad entry raises: a gateway configured to check keys must not start
    without them (nor with a MAC listed for two chips, or a misspelt field, silently ignored)."""
    if not path:
        return DeviceKeys()
    import json
    from pathlib import Path

    text = Path(path).read_text()
    try:
        raw = json.loads(text)
    except ValueError:
        import yaml

        raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of serial number to hex key")
    keys: dict[str, bytes] = {}
    macs: dict[str, str] = {}
    for serial, entry in raw.items():
        serial = str(serial)
        mac = None
        if isinstance(entry, dict):
            unknown = set(entry) - {"key", "mac"}
            if unknown or "key" not in entry:
                raise ValueError(f"{path}: serial {serial!r}: expected {{\"key\": \"<hex>\", \"mac\": \"<Device-Id>\"}} (got {sorted(map(str, entry))})")
            mac = entry.get("mac")
            entry = entry["key"]
            if mac is not None:
                mac = str(mac).strip().lower()
                if not _MAC.fullmatch(mac):
                    raise ValueError(f"{path}: the mac of serial {serial!r} is not a Device-Id")
                if mac in macs:
                    raise ValueError(f"{path}: mac {mac} is listed for serials {macs[mac]!r} and {serial!r}")
                macs[mac] = serial
        try:
            keys[serial] = bytes.fromhex(str(entry))
        except ValueError:
            raise ValueError(f"{path}: the key of serial {serial!r} is not hex") from None
    return DeviceKeys(keys, macs)


def verify_activation(key: bytes, challenge: str, answer: str) -> bool:
    """The firmware's activation answer: lower-case hex HMAC-SHA256 over the challenge with the
    chip's eFuse key (protocol.md §1.5)."""
    expected = hmac.new(key, challenge.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), answer.strip().lower().encode())


def issue_vision_token(key: str, device_id: str, now: int, ttl_seconds: int, session_id: str = "") -> str:
    """A token for the vision endpoint, for this device only.

    With ``session_id`` (v2, what sessions hand out): valid while that session is open, however
    long (the endpoint asks the gateways; a session outlives any fixed TTL), refused once it has
    ended; ``ttl_seconds`` then counts only where no one can be asked. Without (v1): valid
    ``ttl_seconds``."""
    exp = now + ttl_seconds
    if session_id:
        body = f"v2.{_b64(device_id.encode())}.{_b64(session_id.encode())}.{exp}"
    else:
        body = f"v1.{_b64(device_id.encode())}.{exp}"
    return f"{body}.{_b64(_mac(key, 'vision|' + body))}"


def verify_vision(key: str, authorization: str, device_id: str, now: int, session_bound: bool = False) -> AuthResult:
    """Signature, device and (v1, or ``session_bound`` False) expiry; a v2 token's session is in
    the result, for the caller to check that it is still open (``session_bound``: it will, and
    the expiry is not checked)."""
    token = strip_bearer(authorization) if authorization.lower().startswith("bearer") else authorization.strip()
    if not token:
        return AuthResult(False, "missing token")
    parts = token.split(".")
    if not ((len(parts) == 4 and parts[0] == "v1") or (len(parts) == 5 and parts[0] == "v2")) or not parts[-2].isdigit():
        return AuthResult(False, "malformed token")
    body = ".".join(parts[:-1])
    if not hmac.compare_digest(parts[-1].encode(), _b64(_mac(key, "vision|" + body)).encode()):
        return AuthResult(False, "bad signature")
    try:
        bound = _unb64(parts[1]).decode()
        session_id = _unb64(parts[2]).decode() if parts[0] == "v2" else None
    except (ValueError, UnicodeDecodeError):
        return AuthResult(False, "malformed token")
    if bound != device_id:
        return AuthResult(False, "token is for another device")
    if int(parts[-2]) < now and not (session_bound and session_id is not None):
        return AuthResult(False, "token expired")
    return AuthResult(True, session_id=session_id)
