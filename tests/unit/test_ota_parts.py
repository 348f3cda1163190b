"""OTA building blocks: firmware folder, binding store, the OTA answer."""

from __future__ import annotations

from gateway.bindings import SqliteBindingStore
from gateway.firmware import newest_image, parse_version, safe_path
from gateway.ota import build_ota_response
from shared.settings import GatewaySettings


def test_parse_version_numeric_only():
    assert parse_version("2.4.10") == (2, 4, 10)
    assert parse_version("1") == (1,)
    for bad in ("", "1.x", "v1.2", "1..2", "1.2.", "abc"):
        assert parse_version(bad) is None, bad


def test_newest_image_per_board(tmp_path):
    for name in ("b_1.9.bin", "b_1.10.bin", "b_2.bad.bin", "c_9.bin", "b_notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    image = newest_image(tmp_path, "b")
    assert image is not None and image.version == "1.10" and image.filename == "b_1.10.bin"
    assert newest_image(tmp_path, "zzz") is None
    assert newest_image(tmp_path / "missing", "b") is None


def test_safe_path_rejects_escapes(tmp_path):
    (tmp_path / "fw").mkdir()
    (tmp_path / "fw" / "b_1.bin").write_bytes(b"x")
    (tmp_path / "outside.bin").write_bytes(b"x")
    assert safe_path(tmp_path / "fw", "b_1.bin") == (tmp_path / "fw" / "b_1.bin").resolve()
    for bad in ("../outside.bin", "..", "/etc/passwd", "b_1.bin/..", ".hidden.bin", "missing.bin", "a\x00.bin"):
        assert safe_path(tmp_path / "fw", bad) is None, bad


def test_binding_store_persists(tmp_path):
    db = tmp_path / "b.db"
    store = SqliteBindingStore(db)
    code = store.pending_code("AA:BB")
    assert code == store.pending_code("aa:bb") and len(code) == 6
    assert store.pending_code("cc:dd") != code
    assert not store.is_bound("aa:bb")
    assert store.bind("999999" if code != "999999" else "000000", "x") is None
    assert store.bind(code, "alice") == "aa:bb"
    assert store.bind(code, "mallory") is None  # a code works once
    store.close()
    reopened = SqliteBindingStore(db)
    assert reopened.is_bound("AA:BB")
    assert reopened.unbind("aa:bb") and not reopened.is_bound("aa:bb")


def test_ota_answer_shape():
    settings = GatewaySettings(public_host="10.0.0.5", timezone_offset_minutes=480, firmware_dir="/nonexistent")
    answer = build_ota_response(settings, {"application": {"version": "2.4.2"}}, None, now_ms=123, token="t")
    assert answer == {
        "server_time": {"timestamp": 123, "timezone_offset": 480},
        "firmware": {"version": "2.4.2", "url": ""},
        "websocket": {"url": "ws://10.0.0.5:8000/xiaozhi/v1/", "token": "t"},
    }
    assert build_ota_response(settings, {"application": {"version": "abc"}}, None)["firmware"]["version"] == "0.0.0"
    assert build_ota_response(GatewaySettings(websocket_url="wss://x/ws"), {}, None)["websocket"]["url"] == "wss://x/ws"


def test_vision_url_defaults_to_the_public_host_and_can_be_set_whole():
    from gateway.ota import vision_url
    from shared.settings import GatewaySettings

    assert vision_url(GatewaySettings(public_host="10.0.0.5", http_port=8003)) == "http://10.0.0.5:8003/mcp/vision/explain"
    # Behind an ingress the device must get the public https URL, not the pod's port.
    behind = GatewaySettings(public_host="xiaozhi.example.com", vision={"url": "https://xiaozhi.example.com/mcp/vision/explain"})
    assert vision_url(behind) == "https://xiaozhi.example.com/mcp/vision/explain"
