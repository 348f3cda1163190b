"""The gateway's HTTP side and its handling of bad input, against the running pipeline."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import websockets

from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

FW_HEADERS = {"Device-Id": "a0:b1:c2:d3:e4:f5", "Client-Id": "8a1f0000-0000-4000-8000-000000000001", "User-Agent": "bread-compact-wifi/2.4.2", "Content-Type": "application/json"}


@pytest.mark.parametrize("path", ["/xiaozhi/ota/", "/xiaozhi/ota"])
async def test_ota_post_both_url_forms(pipeline, path):
    url = f"http://127.0.0.1:{pipeline.http_port}{path}"
    body = {"application": {"version": "2.4.2"}, "board": {"type": "bread-compact-wifi"}}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers=FW_HEADERS) as response:
            assert response.status == 200
            # No CORS for OTA unless gateway.ota_cors_origins names the page's origin.
            assert "Access-Control-Allow-Origin" not in response.headers
            data = await response.json()
    assert "mqtt" not in data
    assert data["websocket"]["url"] == f"ws://127.0.0.1:{pipeline.ws_port}/xiaozhi/v1/"
    assert data["websocket"]["token"] == ""
    assert isinstance(data["server_time"]["timestamp"], int) and data["server_time"]["timestamp"] > 1_700_000_000_000
    assert isinstance(data["server_time"]["timezone_offset"], int)
    assert data["firmware"] == {"version": "2.4.2", "url": ""}


async def test_ota_only_device_id_required(pipeline):
    async with aiohttp.ClientSession() as http:
        async with http.post(pipeline.ota_url, data=b"not json", headers={"Device-Id": "a0:b1:c2:d3:e4:f5"}) as response:
            assert response.status == 200
            data = await response.json()
            assert data["websocket"]["url"].startswith("ws://")
            assert data["firmware"]["version"] == "0.0.0"
        async with http.post(pipeline.ota_url, json={}) as response:
            assert response.status == 400
            assert "Device-Id" in (await response.json())["message"]


async def test_ota_get_and_options(pipeline):
    async with aiohttp.ClientSession() as http:
        async with http.get(pipeline.ota_url) as response:
            assert response.status == 200
            assert f"ws://127.0.0.1:{pipeline.ws_port}/xiaozhi/v1/" in await response.text()
        async with http.options(pipeline.ota_url, headers={"Origin": "http://some.page", "Access-Control-Request-Method": "POST"}) as response:
            assert response.status == 200
            assert not any(h.lower().startswith("access-control-") for h in response.headers)


async def test_plain_http_on_websocket_port(pipeline):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{pipeline.ws_port}/") as response:
            assert response.status == 200
            assert "running" in await response.text()


async def test_any_path_and_query_string_identity(pipeline):
    """Browsers put the identity in the query string; any path is accepted."""
    url = f"ws://127.0.0.1:{pipeline.ws_port}/some/other/path?device-id=aa:bb:cc:dd:ee:ff&client-id=web"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "hello", "features": {"mcp": True}}))
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["type"] == "hello" and hello["transport"] == "websocket" and hello["session_id"]


async def test_bad_protocol_version_rejected_in_handshake(pipeline):
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(pipeline.ws_url, additional_headers={"Device-Id": "aa:bb:cc:dd:ee:01", "Protocol-Version": "9"}):
            pass
    assert info.value.response.status_code == 400


async def test_missing_device_id_is_told_and_closed(pipeline):
    async with websockets.connect(pipeline.ws_url) as ws:
        text = await asyncio.wait_for(ws.recv(), 5)
        assert "Device-Id" in text
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


async def test_bad_input_does_not_break_the_session(pipeline):
    """Malformed JSON, unknown types, garbage and oversized frames: dropped, session lives on."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        ws = device.ws
        await ws.send("{not json")
        await ws.send(json.dumps({"type": "no_such_type"}))
        await ws.send(json.dumps([1, 2, 3]))
        await ws.send(json.dumps({"type": "listen", "state": "bogus"}))
        await ws.send(json.dumps({"type": "listen", "state": "detect"}))
        await ws.send(b"\x00")  # a 1-byte DTX-like packet: valid v1 frame
        await ws.send(bytes(range(256)) * 4)  # garbage Opus
        # Still alive after all that: a ping message gets its pong.
        mark = len(device.received)
        await device.send_json({"type": "ping"})
        assert await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "pong", 5, mark) is not None
        # Over the 64 KB frame limit (no device sends that): the connection is closed (1009).
        await ws.send(b"\x01" * 70000)
        for _ in range(50):
            if device.closed:
                break
            await asyncio.sleep(0.1)
        assert device.closed
        assert ws.close_code == 1009
    # A fresh device still talks fine afterwards.
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        await device.ws.send("{still not json")
        report = await device.type_text("What time is it?")
        assert report.error is None and report.frames > 0


async def test_metrics_and_health_on_every_service(pipeline):
    async with aiohttp.ClientSession() as http:
        for name, port in pipeline.metrics.items():
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200, name
                health = await response.json()
                assert health["ok"] is True and health["service"] == name and health["nats"] == "connected"
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
                assert "xz_nats_connected" in text, name
        async with http.get(f"http://127.0.0.1:{pipeline.metrics['gateway']}/metrics") as response:
            text = await response.text()
            assert "xz_gateway_sessions" in text
            assert 'xz_dropped_total{reason="bad_json",service="gateway"}' in text
