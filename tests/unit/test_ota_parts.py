"""OTA building blocks: firmware folder, the OTA answer (the binding store: tests/e2e/test_binding_store.py)."""

from __future__ import annotations

from gateway.firmware import newest_image, parse_version, safe_path
from gateway.ota import build_ota_response, device_id_problem, lan_ip, own_hosts, websocket_url
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


def test_device_ids_ota_refuses():
    for ok in ("a0:b1:c2:d3:e4:f5", "A0-B1-C2", "py.xiaozhi_1"):
        assert device_id_problem(ok) is None, ok
    for bad, why in (("", "no_device_id"), ("x" * 65, "bad_device_id"), ("a b", "bad_device_id"), ("é", "bad_device_id"),
                     ("DEFAULT", "reserved_device_id"), ("web-4", "reserved_device_id"), ("Web-1", "reserved_device_id")):
        assert device_id_problem(bad) == why, bad
    assert device_id_problem("web-4", for_ota=False) is None  # the console's devices connect


def test_the_host_header_is_believed_only_when_it_names_this_machine():
    settings = GatewaySettings(ws_port=8000)
    own = own_hosts(settings)
    assert websocket_url(settings, "127.0.0.1", own) == "ws://127.0.0.1:8000/xiaozhi/v1/"
    assert websocket_url(settings, "localhost", own) == "ws://localhost:8000/xiaozhi/v1/"
    assert websocket_url(settings, "evil.example", own) == f"ws://{lan_ip()}:8000/xiaozhi/v1/"
    assert websocket_url(GatewaySettings(public_host="10.0.0.5"), "evil.example") == "ws://10.0.0.5:8000/xiaozhi/v1/"


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
