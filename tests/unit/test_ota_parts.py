"""OTA building blocks: firmware folder, the OTA answer (the binding store itself: tests/e2e/test_binding_store.py)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.auth import DeviceKeys
from gateway.firmware import newest_image, parse_version, safe_path
from gateway.ota import build_ota_response, chip_proof, device_id_problem, lan_ip, make_app, own_hosts, websocket_url
from shared.bindings import BOUND, UNBOUND, Lookup, Pending
from shared.settings import GatewaySettings, Settings


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


def test_a_listed_mac_needs_its_own_chips_proof_whatever_the_headers_say():
    keys = DeviceKeys({"SN1": b"1" * 32, "SN2": b"2" * 32, "OLD": b"3" * 32}, {"aa:01": "SN1", "aa:02": "SN2"})
    assert chip_proof(keys, "AA:01", None) == ("SN1", True)  # no Serial-Number: the MAC's chip all the same
    assert chip_proof(keys, "aa:01", "SN1") == ("SN1", True)
    for mac, serial in (("aa:01", "SN2"), ("aa:01", "unknown"), ("aa:03", "SN2")):
        assert chip_proof(keys, mac, serial) == "serial_mismatch", (mac, serial)  # another chip's serial
    assert chip_proof(keys, "aa:03", "OLD") == ("OLD", True)  # a serial listed without a MAC
    assert chip_proof(keys, "aa:03", None) == (None, False)
    assert chip_proof(keys, "aa:03", "X") == ("X", False)


class CountingStore:
    """A binding store that counts its state lookups: one pair is bound, every other unbound."""

    def __init__(self, bound: tuple[str, str]) -> None:
        self.bound, self.lookups, self.issued = bound, 0, []

    async def lookup(self, device_id: str, client_id: str) -> Lookup:
        self.lookups += 1
        return Lookup(BOUND if (device_id.lower(), client_id) == self.bound else UNBOUND)

    async def pending_code(self, device_id, client_id, serial=None, needs_proof=False, not_before=0.0):
        self.issued.append((device_id, serial, needs_proof))
        return Pending("123456", "nonce", 0.0, serial, not needs_proof)

    async def pending(self, device_id, client_id, not_before=0.0):
        return None


async def test_ota_checks_ids_before_the_store_and_the_bound_pair_pays_per_device():
    store = CountingStore(("aa:bb:cc:dd:ee:ff", "c1"))
    settings = GatewaySettings(binding=True, rate_limits={"ota_per_minute_per_ip": 2, "ota_per_minute_per_device": 3})
    async with TestClient(TestServer(make_app(settings, "k" * 32, store))) as client:
        for bad in ("web-1", "a b"):
            assert (await client.post("/xiaozhi/ota/", headers={"Device-Id": bad})).status == 400
        assert store.lookups == 0  # refused before the store is asked
        # Those unproved requests paid the address's budget: the next unproved one gets 429.
        assert (await client.post("/xiaozhi/ota/", headers={"Device-Id": "aa:bb:cc:dd:ee:ff", "Client-Id": "c2"})).status == 429
        assert store.lookups == 1 and not store.issued
        # The bound pair pays no address budget, only its own (3), one lookup per request.
        pair = {"Device-Id": "AA:BB:CC:DD:EE:FF", "Client-Id": "c1"}
        statuses = [(await client.post("/xiaozhi/ota/", headers=pair)).status for _ in range(2)]
        statuses += [(await client.post("/xiaozhi/ota/activate", headers=pair)).status for _ in range(2)]
        assert statuses == [200, 200, 200, 429] and store.lookups == 5


async def test_with_require_device_keys_an_unlisted_mac_gets_no_code():
    store = CountingStore(("aa:00", "c1"))
    keys = DeviceKeys({"SN1": b"1" * 32}, {"aa:01": "SN1"})
    settings = GatewaySettings(binding=True, auth={"require_device_keys": True})
    async with TestClient(TestServer(make_app(settings, "k" * 32, store, device_keys=keys))) as client:
        for path in ("/xiaozhi/ota/", "/xiaozhi/ota/activate"):
            response = await client.post(path, headers={"Device-Id": "aa:02", "Client-Id": "c1"})
            assert response.status == 403 and "no chip key" in (await response.json())["message"]
        assert not store.issued
        listed = await (await client.post("/xiaozhi/ota/", headers={"Device-Id": "AA:01", "Client-Id": "c1"})).json()
        assert listed["activation"]["code"] and store.issued == [("AA:01", "SN1", True)]
        # A device bound before every chip had a key keeps booting: it needs no code.
        bound = await client.post("/xiaozhi/ota/", headers={"Device-Id": "aa:00", "Client-Id": "c1"})
        assert bound.status == 200 and "activation" not in await bound.json()


def test_require_device_keys_without_a_listed_mac_stops_the_gateway(tmp_path):
    """No device could ever activate: a mistake, refused at start rather than found by owners."""
    from gateway.server import Gateway

    path = tmp_path / "keys.json"
    path.write_text('{"SN1": "%s"}' % ("11" * 32))  # the plain form: no MAC
    for keys_file in (None, str(path)):
        with pytest.raises(ValueError, match="require_device_keys"):
            Gateway(Settings(gateway={"auth": {"require_device_keys": True, "device_keys_file": keys_file, "key": "k" * 32}}))


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


def test_salvaged_body_from_raw_bytes_and_user_agent():
    from gateway.ota import salvaged_body

    raw = b'{"application":{"name":"xiaozhi","version":"2.4.2"},"board":{"type":"bread-compact-wifi","name":"b","ssid":"a"b\xff"}}'
    assert salvaged_body(raw, "bread-compact-wifi/2.4.3") == {"board": {"type": "bread-compact-wifi"}, "application": {"version": "2.4.3"}}
    assert salvaged_body(raw, "") == {"board": {"type": "bread-compact-wifi"}, "application": {"version": "2.4.2"}}
    assert salvaged_body(b'{"board":{"ssid":"\xff', "my-board/1.2") == {"board": {"type": "my-board"}, "application": {"version": "1.2"}}
    assert salvaged_body(b"junk", "Python/3.12 aiohttp/3.9") == {"board": {"type": "Python"}}
    assert salvaged_body(b"junk", "") == {}


def test_timezone_offset_from_the_agent_then_the_setting_then_the_server(monkeypatch):
    from pydantic import ValidationError

    from gateway import ota

    monkeypatch.setattr(ota, "local_timezone_offset_minutes", lambda: 0)
    china = GatewaySettings(timezone_offset_minutes=480, firmware_dir="/nonexistent")
    assert build_ota_response(china, {}, None)["server_time"]["timezone_offset"] == 480
    assert build_ota_response(china, {}, None, timezone_offset=-300)["server_time"]["timezone_offset"] == -300
    assert build_ota_response(china, {}, None, timezone_offset=0)["server_time"]["timezone_offset"] == 0  # UTC, chosen
    assert build_ota_response(GatewaySettings(firmware_dir="/nonexistent"), {}, None)["server_time"]["timezone_offset"] == 0
    # A server in UTC with nothing set: warned at start; a setting (or a local zone) is not.
    assert "timezone_offset_minutes" in (ota.timezone_warning(GatewaySettings()) or "")
    assert ota.timezone_warning(GatewaySettings(timezone_offset_minutes=0)) is None
    monkeypatch.setattr(ota, "local_timezone_offset_minutes", lambda: 60)
    assert ota.timezone_warning(GatewaySettings()) is None
    for bad in (-721, 841):
        with pytest.raises(ValidationError):
            GatewaySettings(timezone_offset_minutes=bad)


def test_vision_url_names_the_host_the_device_reached():
    from gateway.ota import host_only, vision_url

    # Behind Docker or a NAT's port forward the device reaches an address that is not ours.
    assert vision_url(GatewaySettings(http_port=8003), None, "192.168.1.10:8000") == "http://192.168.1.10:8003/mcp/vision/explain"
    assert vision_url(GatewaySettings(http_port=8003), None, "[fd00::5]:8000") == "http://[fd00::5]:8003/mcp/vision/explain"
    assert vision_url(GatewaySettings(public_host="10.0.0.5"), None, "192.168.1.10:8000").startswith("http://10.0.0.5:")
    assert vision_url(GatewaySettings(vision={"url": "https://x/v"}), None, "192.168.1.10") == "https://x/v"
    for junk in ("evil.com/path", "a@b", "", None, "fd00::5"):
        assert host_only(junk) is None, junk
    assert vision_url(GatewaySettings(http_port=8003), None, "evil.com/x?").startswith(f"http://{lan_ip()}:8003/")


def test_which_firmware_drains_its_playback_queue():
    from gateway.firmware import drains_playback
    from gateway.server import FIRMWARE_AGENT

    assert [drains_playback(v) for v in ("2.4.0", "2.4.2", "2.10", "3.0.0-rc1", "2.3.9", "1.9.4", "", None, "abc")] == [True, True, True, True, False, False, False, False, False]
    assert FIRMWARE_AGENT.fullmatch("bread-compact-wifi/2.4.2")["version"] == "2.4.2"
    for other in ("Python/3.12 websockets/14.1", "ESP32 HTTP Client/1.0", "x/", "bread-compact-wifi/2.4.2 extra"):
        assert FIRMWARE_AGENT.fullmatch(other) is None, other
