"""Device authentication on a real gateway process: OTA hands tokens to bound devices only, the
handshake checks them."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import websockets

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from gateway.auth import issue_device_token
from shared.subjects import Subjects
from tests.conftest import start_gateway
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

KEY = "test-secret-key"
ALLOWED = "aa:aa:aa:aa:aa:aa"


async def bind_code(nats_url: str, code: str, owner: str) -> dict | None:
    """Enter a device's code as the manager does (``xz.gateway.bind``); None when nobody holds it."""
    nc = NATS()
    await nc.connect(nats_url)
    try:
        reply = await nc.request(Subjects().gateway_bind, json.dumps({"code": code, "owner": owner}).encode(), timeout=2)
        return json.loads(reply.data)
    except (asyncio.TimeoutError, NoRespondersError):
        return None
    finally:
        await nc.close()


@pytest.fixture
def auth_gateway(nats_only, tmp_path):
    gateway = start_gateway(
        nats_only,
        auth__enabled="true",
        auth__key=KEY,
        auth__allowed_devices=json.dumps([ALLOWED]),
        auth__expire_seconds="3600",
        binding="true",
        binding_db=str(tmp_path / "bindings.db"),
    )
    return gateway.ws_port, gateway.http_port


async def test_ota_token_only_for_the_bound_device_and_it_opens_the_websocket(auth_gateway, nats_only):
    ws_port, http_port = auth_gateway
    device = SimDevice(ota_url=f"http://127.0.0.1:{http_port}/xiaozhi/ota/")
    first = await device.ota()
    # Not bound yet: a code to speak, no token, no session.
    assert first["activation"]["code"] and first["websocket"]["token"] == ""
    with pytest.raises(websockets.InvalidStatus) as info:
        await device.connect()
    assert info.value.response.status_code == 401
    assert (await bind_code(nats_only.nats_url, first["activation"]["code"], "alice"))["device_id"] == device.device_id
    # The firmware polls /activate, then runs OTA again: now it gets its token.
    assert await device.activate(polls=2, wait_pending_s=0.1)
    token = device.ota_response["websocket"]["token"]
    assert token and "." in token and "activation" not in device.ota_response
    await device.connect()
    try:
        assert device.server_hello["transport"] == "websocket"
    finally:
        await device.close()


async def test_handshake_rejects_bad_tokens_with_401(auth_gateway):
    ws_port, _ = auth_gateway
    url = f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/"
    now = int(time.time())
    cases = {
        "missing": {},
        "not bearer": {"Authorization": "Basic abc"},
        "garbage": {"Authorization": "Bearer garbage"},
        "wrong key": {"Authorization": "Bearer " + issue_device_token("other-key", "c1", "bb:bb:bb:bb:bb:bb", now)},
        "other device": {"Authorization": "Bearer " + issue_device_token(KEY, "c1", "cc:cc:cc:cc:cc:cc", now)},
        "expired": {"Authorization": "Bearer " + issue_device_token(KEY, "c1", "bb:bb:bb:bb:bb:bb", now - 7200)},
    }
    for label, extra in cases.items():
        headers = {"Device-Id": "bb:bb:bb:bb:bb:bb", "Client-Id": "c1", **extra}
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401, label


async def test_allow_list_and_query_string_token(auth_gateway):
    ws_port, http_port = auth_gateway
    # An allow-listed device gets an empty token and connects without one.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{http_port}/xiaozhi/ota/", json={}, headers={"Device-Id": ALLOWED}) as response:
            assert (await response.json())["websocket"]["token"] == ""
    async with SimDevice(ws_url=f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/", device_id=ALLOWED, token="") as device:
        assert device.session_id
    # A browser passes identity and token in the query string.
    token = issue_device_token(KEY, "web-client", "dd:dd:dd:dd:dd:dd", int(time.time()))
    url = f"ws://127.0.0.1:{ws_port}/?device-id=dd:dd:dd:dd:dd:dd&client-id=web-client&authorization=Bearer%20{token}"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["transport"] == "websocket"
