"""Device and vision tokens (gateway/auth.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from gateway.auth import DeviceKeys, issue_device_token, issue_vision_token, load_device_keys, strip_bearer, verify_activation, verify_device, verify_vision

KEY = "k"
NOW = 1_800_000_000


def test_device_token_matches_reference_format():
    token = issue_device_token(KEY, "client", "aa:bb:cc:dd:ee:ff", NOW)
    sig, ts = token.split(".")
    assert ts == str(NOW)
    expected = base64.urlsafe_b64encode(hmac.new(b"k", f"client|aa:bb:cc:dd:ee:ff|{NOW}".encode(), hashlib.sha256).digest()).decode().rstrip("=")
    assert sig == expected


def test_device_token_verification():
    token = issue_device_token(KEY, "client", "dev", NOW)
    assert verify_device(KEY, f"Bearer {token}", "client", "dev", NOW + 10, 3600).ok
    assert verify_device(KEY, f"bearer {token}", "client", "dev", NOW, 3600).ok
    assert verify_device(KEY, f"Bearer {token}", "client", "dev", NOW + 3601, 3600).reason == "token expired"
    assert verify_device(KEY, f"Bearer {token}", "other-client", "dev", NOW, 3600).reason == "bad signature"
    assert verify_device(KEY, f"Bearer {token}", "client", "other-dev", NOW, 3600).reason == "bad signature"
    assert verify_device("other", f"Bearer {token}", "client", "dev", NOW, 3600).reason == "bad signature"
    assert verify_device(KEY, token, "client", "dev", NOW, 3600).reason == "not a Bearer token"
    assert verify_device(KEY, "", "client", "dev", NOW, 3600).reason == "missing token"
    assert verify_device(KEY, "Bearer abc", "client", "dev", NOW, 3600).reason == "malformed token"
    assert verify_device(KEY, "Bearer abc.12x", "client", "dev", NOW, 3600).reason == "malformed token"
    future = issue_device_token(KEY, "client", "dev", NOW + 3600)
    assert verify_device(KEY, f"Bearer {future}", "client", "dev", NOW, 7200).reason == "token from the future"


def test_tokens_issued_before_an_unbind_are_revoked():
    token = issue_device_token(KEY, "client", "dev", NOW)
    assert verify_device(KEY, f"Bearer {token}", "client", "dev", NOW + 5, 3600, not_before=NOW + 0.5).reason == "token revoked"
    later = issue_device_token(KEY, "client", "dev", NOW + 2)
    result = verify_device(KEY, f"Bearer {later}", "client", "dev", NOW + 5, 3600, not_before=NOW + 0.5)
    assert result.ok and result.issued_at == NOW + 2


def test_activation_hmac_and_device_keys(tmp_path):
    key = bytes(range(32))
    answer = hmac.new(key, b"nonce-1", hashlib.sha256).hexdigest()
    assert verify_activation(key, "nonce-1", answer) and verify_activation(key, "nonce-1", answer.upper())
    assert not verify_activation(key, "nonce-2", answer) and not verify_activation(b"x" * 32, "nonce-1", answer)
    path = tmp_path / "keys.json"
    path.write_text('{"SN1": "%s"}' % key.hex())
    assert load_device_keys(str(path)) == DeviceKeys({"SN1": key})
    assert load_device_keys(None) == DeviceKeys()
    path.write_text('{"SN1": "zz"}')
    with pytest.raises(ValueError):
        load_device_keys(str(path))


def test_device_keys_can_name_the_chips_mac(tmp_path):
    """Both forms in one file (the plain one still loads); MACs compared case-insensitively."""
    path = tmp_path / "keys.yaml"
    path.write_text(f"SN1: {{key: '{'11' * 32}', mac: 'AA:BB:CC:DD:EE:01'}}\nSN2: '{'22' * 32}'\nSN3: {{key: '{'33' * 32}'}}\n")
    keys = load_device_keys(str(path))
    assert keys.keys == {"SN1": bytes([0x11]) * 32, "SN2": bytes([0x22]) * 32, "SN3": bytes([0x33]) * 32}
    assert keys.macs == {"aa:bb:cc:dd:ee:01": "SN1"}
    assert keys.serial_of("aa:bb:cc:dd:ee:01") == keys.serial_of("AA:BB:CC:DD:EE:01") == "SN1"
    assert keys.serial_of("aa:bb:cc:dd:ee:02") is None
    assert keys.mac_of("SN1") == "aa:bb:cc:dd:ee:01" and keys.mac_of("SN2") is None and keys.mac_of("nope") is None
    for bad in (
        {"SN1": {"key": "11" * 32, "mac": "aa:bb"}, "SN2": {"key": "22" * 32, "mac": "AA:BB"}},  # one MAC, two chips
        {"SN1": {"key": "11" * 32, "MAC": "aa:bb"}},  # a misspelt field is not silently ignored
        {"SN1": {"mac": "aa:bb"}},  # no key
        {"SN1": {"key": "11" * 32, "mac": "aa bb"}},  # not a Device-Id
        {"SN1": {"key": "zz", "mac": "aa:bb"}},
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_device_keys(str(path))


def test_allow_list_needs_no_token():
    assert verify_device(KEY, "", "c", "AA:BB", NOW, 10, frozenset({"aa:bb"})).ok


def test_strip_bearer():
    assert strip_bearer("Bearer  x.y ") == "x.y"
    assert strip_bearer("Token x") is None


def test_vision_token_bound_to_device_and_time():
    token = issue_vision_token(KEY, "dev-1", NOW, 3600)
    assert verify_vision(KEY, f"Bearer {token}", "dev-1", NOW + 100).ok
    assert verify_vision(KEY, token, "dev-1", NOW + 100).ok
    assert verify_vision(KEY, f"Bearer {token}", "dev-2", NOW).reason == "token is for another device"
    assert verify_vision(KEY, f"Bearer {token}", "dev-1", NOW + 3601).reason == "token expired"
    assert verify_vision("other", f"Bearer {token}", "dev-1", NOW).reason == "bad signature"
    tampered = token.replace(".1800003600.", ".1900003600.")
    assert verify_vision(KEY, f"Bearer {tampered}", "dev-1", NOW).reason == "bad signature"
    assert verify_vision(KEY, "Bearer nope", "dev-1", NOW).reason == "malformed token"
    # A device token is not a vision token.
    assert not verify_vision(KEY, "Bearer " + issue_device_token(KEY, "c", "dev-1", NOW), "dev-1", NOW).ok


def test_session_vision_token_lasts_its_session():
    token = issue_vision_token(KEY, "dev-1", NOW, 60, "sess-1")
    assert token.startswith("v2.")
    # Past its TTL: good while the caller checks the session; the TTL counts where none does.
    checked = verify_vision(KEY, f"Bearer {token}", "dev-1", NOW + 86400, session_bound=True)
    assert checked.ok and checked.session_id == "sess-1"
    assert verify_vision(KEY, token, "dev-1", NOW + 61).reason == "token expired"
    assert verify_vision(KEY, token, "dev-2", NOW, session_bound=True).reason == "token is for another device"
    parts = token.split(".")
    forged = ".".join([parts[0], parts[1], issue_vision_token(KEY, "dev-1", NOW, 60, "sess-2").split(".")[2], *parts[3:]])
    assert verify_vision(KEY, forged, "dev-1", NOW, session_bound=True).reason == "bad signature"
    # The v1 form still verifies (no session: the TTL only).
    assert verify_vision(KEY, issue_vision_token(KEY, "dev-1", NOW, 60), "dev-1", NOW, session_bound=True).session_id is None
