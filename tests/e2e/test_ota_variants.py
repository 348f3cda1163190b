"""OTA firmware upgrades and device activation, on a real gateway process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

from tests.conftest import start_gateway
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e


@pytest.fixture
def ota_gateway(nats_only, tmp_path):
    folder = tmp_path / "firmware"
    folder.mkdir()
    (folder / "bread-compact-wifi_2.4.9.bin").write_bytes(b"\xe9" + b"old" * 1000)
    (folder / "bread-compact-wifi_2.4.10.bin").write_bytes(b"\xe9" + b"new-image" * 5000)
    (folder / "bread-compact-wifi_2.x.bin").write_bytes(b"not numeric")
    (folder / "other-board_9.9.9.bin").write_bytes(b"other")
    (tmp_path / "secret.bin").write_bytes(b"secret")
    db = tmp_path / "bindings.db"
    gateway = start_gateway(nats_only, firmware_dir=str(folder), binding="true", binding_db=str(db), console_url="http://console.local")
    return gateway.http_url, db


async def test_firmware_upgrade_offered_and_downloaded(ota_gateway):
    base, _ = ota_gateway
    device = SimDevice(ota_url=f"{base}/xiaozhi/ota/", firmware_version="2.4.2")
    data = await device.ota()
    assert data["firmware"]["version"] == "2.4.10"  # numeric: 2.4.10 is newer than 2.4.9
    url = data["firmware"]["url"]
    assert url == f"{base}/xiaozhi/ota/download/bread-compact-wifi_2.4.10.bin"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            body = await response.read()
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == len(body) == 1 + 9 * 5000
        for bad in ("..%2Fsecret.bin", "%2E%2E%2Fsecret.bin", "secret.txt", "bread-compact-wifi_2.4.10.bin%00"):
            async with http.get(f"{base}/xiaozhi/ota/download/{bad}") as response:
                assert response.status == 404, bad
    # An up-to-date device is not offered anything.
    current = SimDevice(ota_url=f"{base}/xiaozhi/ota", firmware_version="2.4.10")
    assert (await current.ota())["firmware"] == {"version": "2.4.10", "url": ""}


async def test_activation_until_bound(ota_gateway, nats_only):
    base, _ = ota_gateway
    env = {**os.environ, "XZ_NATS__URL": nats_only.nats_url}
    device = SimDevice(ota_url=f"{base}/xiaozhi/ota/")
    data = await device.ota()
    activation = data["activation"]
    code = activation["code"]
    assert len(code) == 6 and code.isdigit()
    assert activation["message"] == f"http://console.local\n{code}" and activation["challenge"]
    assert activation["challenge"] != device.device_id  # a nonce per code, not the MAC
    assert "mqtt" not in data and data["websocket"]["url"]
    # The same code until it is used.
    assert (await SimDevice(ota_url=f"{base}/xiaozhi/ota/", device_id=device.device_id).ota())["activation"]["code"] == code
    # The device polls as the firmware does; nobody has entered the code yet.
    assert await device.activate(polls=2, wait_pending_s=0.1, wait_error_s=0.1) is False
    headers = {"Device-Id": device.device_id, "Client-Id": device.client_id, "Activation-Version": "2"}
    body = {"algorithm": "hmac-sha256", "serial_number": "SN", "challenge": activation["challenge"], "hmac": "0" * 64}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/xiaozhi/ota/activate", json=body, headers=headers) as response:
            assert response.status == 202
        wrong = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "xiaozhi.cli", "bind", "000000" if code != "000000" else "111111"], capture_output=True, text=True, env=env)
        assert wrong.returncode == 1
        bound = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "xiaozhi.cli", "bind", code, "--owner", "alice"], capture_output=True, text=True, env=env)
        assert bound.returncode == 0 and device.device_id in bound.stdout
        async with http.post(f"{base}/xiaozhi/ota/activate", data=b"{}", headers=headers) as response:
            assert response.status == 200
    assert await device.activate(polls=2, wait_pending_s=0.1) is True
    again = await SimDevice(ota_url=f"{base}/xiaozhi/ota/", device_id=device.device_id).ota()
    assert "activation" not in again


async def test_xiaozhi_bind_asks_the_gateways_over_nats(ota_gateway, nats_only):
    base, _ = ota_gateway
    device = SimDevice(ota_url=f"{base}/xiaozhi/ota/")
    code = (await device.ota())["activation"]["code"]
    env = {**os.environ, "XZ_NATS__URL": nats_only.nats_url}
    wrong = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "xiaozhi.cli", "bind", "000000" if code != "000000" else "111111"], capture_output=True, text=True, env=env)
    assert wrong.returncode == 1 and "no device is waiting" in wrong.stderr
    bound = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "xiaozhi.cli", "bind", code, "--owner", "alice"], capture_output=True, text=True, env=env)
    assert bound.returncode == 0 and device.device_id in bound.stdout, bound.stderr
    assert await device.activate(polls=2, wait_pending_s=0.1)
    # The same MAC under another Client-Id (a phantom), bound by someone else: refused.
    phantom = SimDevice(ota_url=f"{base}/xiaozhi/ota/", device_id=device.device_id, client_id="someone-else")
    other = (await phantom.ota())["activation"]["code"]
    refused = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "xiaozhi.cli", "bind", other, "--owner", "mallory"], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "bound to another owner" in refused.stderr


def firmware_body(board: str, version: str, ssid: bytes) -> bytes:
    """The system-info as the firmware builds it, by hand (board.cc, wifi_board.cc): the SSID is
    pasted in as it is, so a `"` or bytes that are not UTF-8 make it invalid JSON."""
    return (
        b'{"version":2,"language":"zh-CN","flash_size":16777216,"minimum_free_heap_size":"123456",'
        b'"mac_address":"a0:b1:c2:d3:e4:01","uuid":"u-1","chip_model_name":"esp32s3",'
        b'"application":{"name":"xiaozhi","version":"' + version.encode() + b'","compile_time":"Aug  8 2026T08:33:45Z","idf_version":"v5.5.2"},'
        b'"ota":{"label":"ota_0"},'
        b'"board":{"type":"' + board.encode() + b'","name":"' + board.encode() + b'","manufacturer":"x","ssid":"' + ssid + b'","rssi":-50,"channel":6,"ip":"192.168.1.20","mac":"a0:b1:c2:d3:e4:01"}}'
    )


@pytest.mark.parametrize("path", ["/xiaozhi/ota/", "/xiaozhi/ota", "/ota/", "/ota", "/", ""])
async def test_every_url_form_users_type(ota_gateway, path):
    """Each OTA URL a user may type in the Wi-Fi portal (firmware >= 2.4.1) gets the full answer,
    and the activation URL the firmware derives from it (ota.cc) is served."""
    base, _ = ota_gateway
    ota_url = base + path
    device = SimDevice(ota_url=ota_url, firmware_version="2.4.2")
    data = await device.ota()
    assert data["firmware"]["version"] == "2.4.10" and data["firmware"]["url"] == f"{base}/xiaozhi/ota/download/bread-compact-wifi_2.4.10.bin"
    assert data["websocket"]["url"].startswith("ws://127.0.0.1:") and data["activation"]["code"]
    assert await device.activate(polls=1, wait_pending_s=0.05) is False  # 202: the owner has not bound it
    activate = ota_url + ("activate" if ota_url.endswith("/") else "/activate")
    headers = {"Device-Id": device.device_id, "Client-Id": device.client_id}
    async with aiohttp.ClientSession() as http:
        async with http.post(activate, data=b"{}", headers=headers) as response:
            assert response.status == 202, activate
        async with http.get(ota_url) as response:
            assert response.status == 200 and "websocket address" in await response.text()
        async with http.options(ota_url) as response:
            assert response.status == 200
        async with http.post(f"{base}/otax", data=b"{}", headers=headers) as response:
            assert response.status == 404


async def test_broken_body_still_gets_the_upgrade(ota_gateway):
    """An SSID with `"` and bytes that are not UTF-8 breaks the firmware's hand-built body: the
    board comes from the raw bytes (else the User-Agent), the version from the User-Agent, and
    the upgrade is offered."""
    base, _ = ota_gateway
    headers = {"Device-Id": "a0:b1:c2:d3:e4:01", "Client-Id": "u-1", "User-Agent": "bread-compact-wifi/2.4.2", "Content-Type": "application/json"}
    body = firmware_body("bread-compact-wifi", "2.4.2", b'Zhang\'s "5G" \xe5\xae\xb6\xff\xfe')
    with pytest.raises(ValueError):
        json.loads(body)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/ota/", data=body, headers=headers) as response:
            assert response.status == 200
            data = await response.json()
        assert data["firmware"] == {"version": "2.4.10", "url": f"{base}/xiaozhi/ota/download/bread-compact-wifi_2.4.10.bin"}
        assert data["activation"]["code"] and data["websocket"]["url"]
        # Cut before the board's type: the User-Agent names the board.
        async with http.post(f"{base}/", data=b'{"version":2,"board":{"ssid":"\xff"', headers={**headers, "Device-Id": "a0:b1:c2:d3:e4:02"}) as response:
            assert (await response.json())["firmware"]["version"] == "2.4.10"
        # The newest version already runs: nothing offered.
        current = firmware_body("bread-compact-wifi", "2.4.10", b'"\xff')
        async with http.post(f"{base}/xiaozhi/ota/", data=current, headers={**headers, "Device-Id": "a0:b1:c2:d3:e4:03", "User-Agent": "bread-compact-wifi/2.4.10"}) as response:
            assert (await response.json())["firmware"] == {"version": "2.4.10", "url": ""}


async def test_a_gateway_in_utc_without_a_setting_warns(nats_only, monkeypatch):
    """A container runs in UTC: without gateway.timezone_offset_minutes every clock would show
    UTC, so the gateway says so at start; with the setting it says nothing and OTA carries it."""
    monkeypatch.setenv("TZ", "UTC")
    log = nats_only.log_dir / "gateway.log"
    bare = start_gateway(nats_only)
    bare.stop()
    assert "devices' clocks show UTC" in log.read_text()
    log.unlink()
    china = start_gateway(nats_only, timezone_offset_minutes="480")
    data = await SimDevice(ota_url=f"{china.http_url}/ota/").ota()
    assert data["server_time"]["timezone_offset"] == 480
    assert "clocks show UTC" not in log.read_text()
