"""Attacks on a real gateway process (issue 14: vulns 1, 2, 7, 10 and the OTA/token weaknesses).

Each test performs the attack as a LAN attacker would, against a gateway started as its own
process on a real nats-server. The attacker speaks from 127.0.0.2 where limits per address
matter, so they hit the attacker and not the real device (on 127.0.0.1) beside it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import urllib.request
import uuid

import aiohttp
import pytest
import websockets
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from shared.bindings import BindingStore
from shared.subjects import Subjects
from tests.conftest import start_gateway
from gateway.ota import lan_ip
from xiaozhi.attack import Attacker
from xiaozhi.sim import SimDevice, random_mac

pytestmark = pytest.mark.e2e

KEY = "security-test-key"
ATTACKER_IP = "127.0.0.2"


def health(gateway) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.proc.metrics_port}/healthz", timeout=3) as response:
        return json.loads(response.read())


async def request(nats_url: str, subject: str, body: dict, timeout: float = 2) -> dict | None:
    nc = NATS()
    await nc.connect(nats_url)
    try:
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
        return json.loads(reply.data)
    except (asyncio.TimeoutError, NoRespondersError):
        return None
    finally:
        await nc.close()


async def bind(nats_url: str, code: str, owner: str) -> dict | None:
    """The manager's bind by code (``xz.gateway.bind``); None when no device waits with it."""
    answer = await request(nats_url, Subjects().gateway_bind, {"code": code, "owner": owner})
    return None if answer is None or answer.get("found") is False else answer


def binding_gateway(stack, tmp_path, auth: bool, **extra: str):
    settings = {"binding": "true", "binding_db": str(tmp_path / "bindings.db"), "auth__key": KEY, **extra}
    if auth:
        settings["auth__enabled"] = "true"
    return start_gateway(stack, **settings)


async def owned_device(gateway, nats_url: str, owner: str = "alice") -> SimDevice:
    """A real device that booted, spoke its code, was bound by ``owner`` and re-ran OTA."""
    device = SimDevice(ota_url=f"{gateway.http_url}/xiaozhi/ota/")
    code = (await device.ota())["activation"]["code"]
    assert (await bind(nats_url, code, owner))["device_id"] == device.device_id
    assert await device.activate(polls=3, wait_pending_s=0.1)
    return device


async def post_ota(url: str, headers: dict, local: str | None = None, body: bytes = b"{}") -> tuple[int, dict, dict]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0)) if local else None
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as response:
            text = await response.text()
            try:
                data = json.loads(text)
            except ValueError:
                data = {}
            return response.status, data, dict(response.headers)


async def handshake(url: str, headers: dict, local: str | None = None) -> int:
    """The HTTP status of a WebSocket handshake (101: admitted)."""
    try:
        ws = await websockets.connect(url, additional_headers=headers, open_timeout=5, ping_interval=None, close_timeout=1, **({"local_addr": (local, 0)} if local else {}))
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


async def closed_with(device: SimDevice, timeout: float = 5) -> int | None:
    """The close code once the gateway closed ``device``'s WebSocket (None: still open)."""
    for _ in range(int(timeout / 0.1)):
        if device.ws.close_code is not None:
            break
        await asyncio.sleep(0.1)
    return device.ws.close_code


# ------------------------------------------------------------------ vuln 1: tokens for anyone


@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
async def test_an_impersonator_with_the_victims_mac_gets_no_token_and_no_session(nats_only, tmp_path, auth):
    gateway = binding_gateway(nats_only, tmp_path, auth)
    try:
        victim = await owned_device(gateway, nats_only.nats_url)
        if auth:
            assert victim.token, "the bound device gets its token"
        # The attacker knows the MAC (it is on every frame the device sends) and asks OTA as it.
        status, answer, _ = await post_ota(f"{gateway.http_url}/xiaozhi/ota/", {"Device-Id": victim.device_id, "Client-Id": str(uuid.uuid4())})
        assert status == 200
        assert answer["websocket"]["token"] == ""  # no token for a pair nobody bound
        assert "activation" in answer  # only a code for its own, phantom pair
        # Nor a session as the victim: with a token-less handshake, with a forged token, under
        # its own Client-Id.
        attacker = SimDevice(ws_url=gateway.ws_url, device_id=victim.device_id, client_id=str(uuid.uuid4()), token=answer["websocket"]["token"])
        with pytest.raises(websockets.InvalidStatus) as info:
            await attacker.connect()
        assert info.value.response.status_code == 401
        # The real device still connects.
        async with SimDevice(ws_url=gateway.ws_url, device_id=victim.device_id, client_id=victim.client_id, token=victim.token) as real:
            assert real.session_id
    finally:
        gateway.stop()


# ------------------------------------------------------------------ vuln 2: binding someone's device


async def test_the_code_the_device_speaks_is_not_the_attackers_and_a_phantom_bind_does_not_capture_it(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=True)
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    try:
        device = SimDevice(ota_url=ota_url)
        spoken = (await device.ota())["activation"]
        # The attacker asks OTA with the device's MAC before its owner enters the code.
        status, answer, _ = await post_ota(ota_url, {"Device-Id": device.device_id, "Client-Id": str(uuid.uuid4())}, local=ATTACKER_IP)
        assert status == 200
        phantom = answer["activation"]
        assert phantom["code"] != spoken["code"] and phantom["challenge"] != spoken["challenge"]
        assert spoken["challenge"] != device.device_id  # a nonce, not the MAC
        # The attacker binds its phantom code to its own account.
        assert (await bind(nats_only.nats_url, phantom["code"], "mallory"))["device_id"] == device.device_id
        # The real device is not mallory's: its activation does not complete, it gets no token
        # and no session (its words never reach mallory's agent or history) ...
        assert await device.activate(polls=2, wait_pending_s=0.1, wait_error_s=0.1) is False
        again = await SimDevice(ota_url=ota_url, device_id=device.device_id).ota()
        assert again["websocket"]["token"] == "" and "activation" in again
        assert await handshake(gateway.ws_url, {"Device-Id": device.device_id, "Client-Id": device.client_id}) == 401
        # ... and its owner entering the spoken code is refused as a conflict (the manager
        # answers 409 and an admin resolves it), not silently handed to mallory.
        assert await bind(nats_only.nats_url, again["activation"]["code"], "alice") == {"device_id": device.device_id, "conflict": True}

        # The other order: the owner bound it first; the attacker's phantom changes nothing.
        owned = await owned_device(gateway, nats_only.nats_url, "bob")
        _, answer, _ = await post_ota(ota_url, {"Device-Id": owned.device_id, "Client-Id": str(uuid.uuid4())}, local=ATTACKER_IP)
        assert await bind(nats_only.nats_url, answer["activation"]["code"], "mallory") == {"device_id": owned.device_id, "conflict": True}
        async with SimDevice(ws_url=gateway.ws_url, device_id=owned.device_id, token=owned.token) as real:
            assert real.session_id
    finally:
        gateway.stop()


async def test_the_owners_reflashed_device_replaces_its_old_binding(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=True)
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    try:
        old = await owned_device(gateway, nats_only.nats_url, "alice")
        live = SimDevice(ws_url=gateway.ws_url, device_id=old.device_id, token=old.token)
        await live.connect()
        # Re-flashed: NVS erased, a new Client-Id; it activates again and its owner enters the code.
        reflashed = SimDevice(ota_url=ota_url, device_id=old.device_id, client_id=str(uuid.uuid4()))
        code = (await reflashed.ota())["activation"]["code"]
        assert (await bind(nats_only.nats_url, code, "alice"))["device_id"] == old.device_id
        assert await reflashed.activate(polls=2, wait_pending_s=0.1) and reflashed.token
        # The old pair's session ended and its token is revoked; the new pair connects.
        assert await closed_with(live) == 4001
        await live.close()
        assert await handshake(gateway.ws_url, {"Device-Id": old.device_id, "Client-Id": old.client_id, "Authorization": f"Bearer {old.token}"}) == 401
        async with SimDevice(ws_url=gateway.ws_url, device_id=old.device_id, client_id=reflashed.client_id, token=reflashed.token) as device:
            assert device.session_id
    finally:
        gateway.stop()


async def test_a_chip_with_a_known_key_must_answer_its_challenge_before_its_code_binds(nats_only, tmp_path):
    key = bytes(range(32))
    keys = tmp_path / "device-keys.json"
    keys.write_text(json.dumps({"SN-0001": key.hex()}))
    gateway = binding_gateway(nats_only, tmp_path, auth=True, auth__device_keys_file=str(keys))
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    mac, client = random_mac(), str(uuid.uuid4())
    headers = {"Device-Id": mac, "Client-Id": client, "Activation-Version": "2", "Serial-Number": "SN-0001"}
    try:
        _, answer, _ = await post_ota(ota_url, headers)
        challenge, code = answer["activation"]["challenge"], answer["activation"]["code"]
        wrong = {"algorithm": "hmac-sha256", "serial_number": "SN-0001", "challenge": challenge, "hmac": "0" * 64}
        status, _, _ = await post_ota(ota_url + "activate", headers, body=json.dumps(wrong).encode())
        assert status == 403
        assert await bind(nats_only.nats_url, code, "alice") is None  # not proved yet: no such code
        right = {**wrong, "hmac": hmac.new(key, challenge.encode(), hashlib.sha256).hexdigest()}
        assert (await post_ota(ota_url + "activate", headers, body=json.dumps(right).encode()))[0] == 202
        assert (await bind(nats_only.nats_url, code, "alice"))["device_id"] == mac
        assert (await post_ota(ota_url + "activate", headers, body=json.dumps(right).encode()))[0] == 200
    finally:
        gateway.stop()


async def test_a_keyed_chips_mac_needs_its_proof_whatever_headers_the_request_carries(nats_only, tmp_path):
    """The attacker knows the chip's MAC and Client-Id (sniffed) and asks OTA as it without the
    chip's headers, or naming another chip it holds the key of (its own board): no code for
    that MAC binds without the proof of the chip listed with it."""
    key, own_key = bytes(range(32)), bytes(range(32, 64))
    mac, client, attackers_mac = random_mac(), str(uuid.uuid4()), random_mac()
    keys = tmp_path / "device-keys.json"
    keys.write_text(json.dumps({"SN-0001": {"key": key.hex(), "mac": mac.upper()}, "SN-0002": {"key": own_key.hex(), "mac": attackers_mac}}))
    gateway = binding_gateway(nats_only, tmp_path, auth=True, auth__device_keys_file=str(keys))
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    pair = {"Device-Id": mac, "Client-Id": client}
    try:
        for headers in (pair, {**pair, "Activation-Version": "1"}, {**pair, "Activation-Version": "2"}):
            status, answer, _ = await post_ota(ota_url, headers, local=ATTACKER_IP)
            assert status == 200, (headers, status)
            code = answer["activation"]["code"]
            assert await bind(nats_only.nats_url, code, "mallory") is None, headers  # not proved: no such code
        # Another chip's serial (the attacker's own board, listed with its own MAC) is refused,
        # and so is a serial the file does not give this MAC.
        for serial in ("SN-0002", "SN-9999"):
            status, _, _ = await post_ota(ota_url, {**pair, "Activation-Version": "2", "Serial-Number": serial}, local=ATTACKER_IP)
            assert status == 403, serial
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.proc.metrics_port}/metrics", timeout=3) as response:
            assert 'xz_gateway_ota_requests_total{method="POST",result="serial_mismatch"} 2.0' in response.read().decode()
        # Answering the code's challenge with the attacker's own chip key does not prove this chip.
        _, answer, _ = await post_ota(ota_url, pair, local=ATTACKER_IP)
        challenge = answer["activation"]["challenge"]
        forged = {"algorithm": "hmac-sha256", "serial_number": "SN-0002", "challenge": challenge, "hmac": hmac.new(own_key, challenge.encode(), hashlib.sha256).hexdigest()}
        assert (await post_ota(ota_url + "activate", pair, local=ATTACKER_IP, body=json.dumps(forged).encode()))[0] == 403
        forged = {**forged, "serial_number": "SN-0001"}
        assert (await post_ota(ota_url + "activate", pair, local=ATTACKER_IP, body=json.dumps(forged).encode()))[0] == 403
        assert await bind(nats_only.nats_url, answer["activation"]["code"], "mallory") is None
        # The chip itself, with its firmware's headers (in either case of its MAC), proves itself and is bound.
        headers = {**pair, "Device-Id": mac.upper(), "Activation-Version": "2", "Serial-Number": "SN-0001"}
        _, answer, _ = await post_ota(ota_url, headers)
        challenge, code = answer["activation"]["challenge"], answer["activation"]["code"]
        right = {"algorithm": "hmac-sha256", "serial_number": "SN-0001", "challenge": challenge, "hmac": hmac.new(key, challenge.encode(), hashlib.sha256).hexdigest()}
        assert (await post_ota(ota_url + "activate", headers, body=json.dumps(right).encode()))[0] == 202
        assert (await bind(nats_only.nats_url, code, "alice"))["device_id"] == mac
    finally:
        gateway.stop()


async def test_with_require_device_keys_a_mac_without_a_key_gets_no_code(nats_only, tmp_path):
    key, mac = bytes(range(32)), random_mac()
    keys = tmp_path / "device-keys.json"
    keys.write_text(json.dumps({"SN-0001": {"key": key.hex(), "mac": mac}}))
    gateway = binding_gateway(nats_only, tmp_path, auth=True, auth__device_keys_file=str(keys), auth__require_device_keys="true")
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    try:
        # A board nobody listed (or one claiming to be a keyless chip) cannot start an activation.
        for headers in ({"Device-Id": random_mac()}, {"Device-Id": random_mac(), "Activation-Version": "2", "Serial-Number": "SN-0001"}):
            status, answer, _ = await post_ota(ota_url, headers, local=ATTACKER_IP)
            assert status == 403 and "activation" not in answer, (status, answer)
        status, answer, _ = await post_ota(ota_url, {"Device-Id": mac, "Client-Id": str(uuid.uuid4())})
        assert status == 200 and answer["activation"]["code"]
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.proc.metrics_port}/metrics", timeout=3) as response:
            metrics = response.read().decode()
        assert 'xz_gateway_ota_requests_total{method="POST",result="no_chip_key"} 2.0' in metrics
    finally:
        gateway.stop()


# ------------------------------------------------------------------ vuln 7: the OTA flood


async def test_an_ota_flood_gets_429_while_a_normal_device_still_connects(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=True)
    try:
        attacker = Attacker(gateway.ws_url, gateway.http_url, source_ip=ATTACKER_IP)

        async def normal_device() -> SimDevice:
            await asyncio.sleep(0.2)  # in the middle of the flood
            return await owned_device(gateway, nats_only.nats_url)

        started = time.monotonic()
        _, device = await asyncio.gather(attacker.ota_flood(400), normal_device())
        outcomes = {k: v for k, v in attacker.outcomes.items() if k.startswith("OTA flood")}
        print(outcomes, f"{time.monotonic() - started:.1f} s")
        assert outcomes.get("OTA flood: HTTP 429", 0) >= 300, outcomes
        assert outcomes.get("OTA flood: HTTP 200", 0) <= 61, outcomes  # the address's burst, no more
        assert sum(outcomes.values()) == 400  # every request answered, none hung
        async with SimDevice(ws_url=gateway.ws_url, device_id=device.device_id, token=device.token) as live:
            assert live.session_id
        assert health(gateway)["ok"]
    finally:
        gateway.stop()


async def test_forged_x_forwarded_for_does_not_escape_the_limit_and_a_trusted_proxys_does_count(nats_only, tmp_path):
    ota = "/xiaozhi/ota/"
    direct = binding_gateway(nats_only, tmp_path / "a", auth=False, rate_limits__ota_per_minute_per_ip="5")
    proxied = binding_gateway(nats_only, tmp_path / "b", auth=False, rate_limits__ota_per_minute_per_ip="5", trusted_proxies=json.dumps(["127.0.0.1"]))
    try:
        # Straight to the gateway: a new X-Forwarded-For each time changes nothing.
        statuses = [(await post_ota(direct.http_url + ota, {"Device-Id": random_mac(), "X-Forwarded-For": f"6.6.6.{i}"}, local=ATTACKER_IP))[0] for i in range(8)]
        assert statuses == [200] * 5 + [429] * 3, statuses
        # Behind a proxy the operator trusts (here 127.0.0.1), each client has its own budget.
        flood = [(await post_ota(proxied.http_url + ota, {"Device-Id": random_mac(), "X-Forwarded-For": "6.6.6.6"}))[0] for _ in range(8)]
        assert flood == [200] * 5 + [429] * 3, flood
        assert (await post_ota(proxied.http_url + ota, {"Device-Id": random_mac(), "X-Forwarded-For": "7.7.7.7"}))[0] == 200
        # ... and a client cannot pose as another by writing the header itself: the proxy's entry counts.
        assert (await post_ota(proxied.http_url + ota, {"Device-Id": random_mac(), "X-Forwarded-For": "8.8.8.8, 6.6.6.6"}))[0] == 429
    finally:
        direct.stop()
        proxied.stop()


@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
async def test_an_ota_flood_from_the_devices_own_address_does_not_keep_the_bound_device_from_booting(nats_only, tmp_path, auth):
    """Someone behind the device's home NAT (the same public address) floods OTA until the
    address's budget is gone: the bound device still boots (OTA and /activate answer it), limited
    per device instead; every unproved request from the address, the device's MAC under another
    Client-Id included, still gets 429."""
    gateway = binding_gateway(nats_only, tmp_path, auth=auth, rate_limits__ota_per_minute_per_ip="5", rate_limits__ota_per_minute_per_device="8")
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    try:
        device = await owned_device(gateway, nats_only.nats_url)  # from 127.0.0.1, the shared address
        attacker = Attacker(gateway.ws_url, gateway.http_url)  # the same address
        await attacker.ota_flood(30)
        outcomes = {k: v for k, v in attacker.outcomes.items() if k.startswith("OTA flood")}
        print(outcomes)
        assert outcomes.get("OTA flood: HTTP 429", 0) >= 26, outcomes
        pair = {"Device-Id": device.device_id, "Client-Id": device.client_id}
        status, answer, _ = await post_ota(ota_url, pair)
        print("the device's OTA after the flood:", status, answer)
        assert status == 200 and "activation" not in answer
        assert bool(answer["websocket"]["token"]) == auth
        assert (await post_ota(ota_url + "activate", pair))[0] == 200
        for unproved in ({"Device-Id": device.device_id, "Client-Id": str(uuid.uuid4())}, {"Device-Id": device.device_id}, {"Device-Id": random_mac()}):
            assert (await post_ota(ota_url, unproved))[0] == 429, unproved
        # Nor can the pair's own requests flood: they have a budget of their own.
        statuses = [(await post_ota(ota_url, pair))[0] for _ in range(8)]
        assert 429 in statuses and statuses.count(200) <= 6 and statuses == sorted(statuses), statuses
    finally:
        gateway.stop()


async def test_when_every_activation_code_is_taken_ota_fails_cleanly(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=True, max_pending_codes="20", rate_limits__ota_per_minute_per_ip="0")
    ota_url = f"{gateway.http_url}/xiaozhi/ota/"
    try:
        owned = await owned_device(gateway, nats_only.nats_url)
        statuses = []
        for _ in range(25):
            statuses.append((await asyncio.wait_for(post_ota(ota_url, {"Device-Id": random_mac()}), 5))[0])
        # 19 more fit beside nothing (the owned device's code was used); then 503, at once.
        assert statuses.count(200) == 20 and statuses[20:] == [503] * 5, statuses
        # The bound device needs no code: it still boots, gets its token and talks.
        status, answer, _ = await post_ota(ota_url, {"Device-Id": owned.device_id, "Client-Id": owned.client_id})
        assert status == 200 and answer["websocket"]["token"] and "activation" not in answer
        async with SimDevice(ws_url=gateway.ws_url, device_id=owned.device_id, token=answer["websocket"]["token"]) as live:
            assert live.session_id
        assert health(gateway)["ok"]
    finally:
        gateway.stop()


# ------------------------------------------------------------------ vuln 10: the handshake limit


@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
async def test_token_less_handshakes_with_the_victims_id_do_not_lock_it_out(nats_only, tmp_path, auth):
    gateway = binding_gateway(nats_only, tmp_path, auth)
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        # With auth on the attacker may even use the device's Client-Id (sniffed): no token, no
        # entry. With auth off the pair is the only proof: it uses a Client-Id of its own.
        client = device.client_id if auth else str(uuid.uuid4())
        attacker = Attacker(gateway.ws_url, gateway.http_url, source_ip=ATTACKER_IP,
                            victim={"device_id": device.device_id, "client_id": client, "token": ""})
        await attacker.handshake_limit(30)
        outcomes = dict(attacker.outcomes)
        print(outcomes)
        assert "handshake limit: HTTP 101 without a token" not in outcomes, outcomes
        assert outcomes.get("handshake limit: HTTP 401", 0) == 10, outcomes  # then the address is refused
        assert outcomes.get("handshake limit: HTTP 429", 0) == 20, outcomes
        # The real device, from its own address, connects at once ...
        async with SimDevice(ws_url=gateway.ws_url, device_id=device.device_id, token=device.token) as live:
            assert live.session_id
        # ... and so does a device behind the attacker's own address (a shared NAT): the lockout
        # refuses only handshakes that fail.
        real = {"Device-Id": device.device_id, "Client-Id": device.client_id, **({"Authorization": f"Bearer {device.token}"} if device.token else {})}
        assert await handshake(gateway.ws_url, real, local=ATTACKER_IP) == 101
        assert await handshake(gateway.ws_url, {"Device-Id": device.device_id, "Client-Id": client}, local=ATTACKER_IP) == 429
    finally:
        gateway.stop()


async def test_unproved_handshakes_do_not_use_up_the_addresss_budget_for_the_device(nats_only, tmp_path):
    """Someone behind the device's own address (a home NAT) opens connections that prove
    nothing until the address's connection budget is gone: the device, which proves itself,
    still connects; the unproved ones are refused."""
    gateway = binding_gateway(nats_only, tmp_path, auth=False, rate_limits__connections_per_minute_per_ip="5")
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        statuses = [await handshake(gateway.ws_url, {"Device-Id": random_mac(), "Client-Id": str(uuid.uuid4())}, local=ATTACKER_IP) for _ in range(8)]
        assert statuses == [101] * 5 + [429] * 3, statuses
        real = {"Device-Id": device.device_id, "Client-Id": device.client_id}
        assert await handshake(gateway.ws_url, real, local=ATTACKER_IP) == 101
    finally:
        gateway.stop()


# ------------------------------------------------------------------ unbind, one session


async def test_unbind_over_nats_revokes_the_token_and_closes_the_session(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=True)
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        token = device.token
        live = SimDevice(ws_url=gateway.ws_url, device_id=device.device_id, token=token)
        await live.connect()
        reply = await request(nats_only.nats_url, Subjects().gateway_unbind, {"device_id": device.device_id.upper()})
        assert reply == {"device_id": device.device_id, "unbound": True, "sessions_closed": 1}
        assert await closed_with(live) == 4001
        await live.close()
        # The old token no longer opens a session.
        assert await handshake(gateway.ws_url, {"Device-Id": device.device_id, "Client-Id": device.client_id, "Authorization": f"Bearer {token}"}) == 401
        # The device is unbound: its next boot gets a code and no token.
        again = await SimDevice(ota_url=f"{gateway.http_url}/xiaozhi/ota/", device_id=device.device_id).ota()
        assert "activation" in again and again["websocket"]["token"] == ""
    finally:
        gateway.stop()


# ------------------------------------------------------------------ one binding store for all gateways


async def test_every_gateway_knows_every_binding_and_a_phantom_on_another_gateway_is_a_conflict(nats_only, tmp_path):
    # Two replicas behind a load balancer, each with its own (old-style) binding file path: the
    # bindings are in the shared store all the same.
    first = binding_gateway(nats_only, tmp_path / "a", auth=True)
    second = binding_gateway(nats_only, tmp_path / "b", auth=True)
    try:
        device = await owned_device(first, nats_only.nats_url)
        # The device's next boot lands on the other replica: bound there too, a token, no code.
        again = await SimDevice(ota_url=f"{second.http_url}/xiaozhi/ota/", device_id=device.device_id, client_id=device.client_id).ota()
        assert "activation" not in again and again["websocket"]["token"]
        async with SimDevice(ws_url=second.ws_url, device_id=device.device_id, client_id=device.client_id, token=again["websocket"]["token"]) as real:
            assert real.session_id
        # The attacker's phantom pair for the bound MAC, asked on the other replica: refused in
        # the handshake there, and its code, entered by another owner, binds nothing.
        _, answer, _ = await post_ota(f"{second.http_url}/xiaozhi/ota/", {"Device-Id": device.device_id, "Client-Id": str(uuid.uuid4())}, local=ATTACKER_IP)
        assert await bind(nats_only.nats_url, answer["activation"]["code"], "mallory") == {"device_id": device.device_id, "conflict": True}
        assert await handshake(second.ws_url, {"Device-Id": device.device_id, "Client-Id": "phantom"}, local=ATTACKER_IP) == 401
        # The manager's first step only asks: nothing is written, whatever its answer.
        code = (await SimDevice(ota_url=f"{second.http_url}/xiaozhi/ota/").ota())["activation"]["code"]
        checked = await request(nats_only.nats_url, Subjects().gateway_bind, {"code": code, "owner": "carol", "owner_id": 7, "commit": False})
        assert checked["committed"] is False
        committed = await request(nats_only.nats_url, Subjects().gateway_bind, {"code": code, "owner": "carol", "owner_id": 7})
        assert committed["committed"] is True and committed["device_id"] == checked["device_id"]
    finally:
        first.stop()
        second.stop()


async def test_an_unbind_a_gateway_never_heard_of_still_closes_the_session(nats_only, tmp_path):
    # The unbind is written to the shared store while no event reaches the gateway (it was cut
    # off from NATS at that moment): its re-check closes the session, and the token is refused.
    gateway = binding_gateway(nats_only, tmp_path, auth=True, binding_recheck_s="1")
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        live = SimDevice(ws_url=gateway.ws_url, device_id=device.device_id, client_id=device.client_id, token=device.token)
        await live.connect()
        nc = NATS()
        await nc.connect(nats_only.nats_url)
        try:
            assert await BindingStore(nc).unbind(device.device_id) is True
        finally:
            await nc.close()
        assert await closed_with(live, timeout=8) == 4001
        await live.close()
        assert await handshake(gateway.ws_url, {"Device-Id": device.device_id, "Client-Id": device.client_id, "Authorization": f"Bearer {device.token}"}) == 401
    finally:
        gateway.stop()


async def test_without_the_binding_store_nothing_is_guessed(nats_only, tmp_path):
    # NATS gone: whether a pair is bound cannot be told, so OTA gives no code or token and the
    # handshake admits nobody (503), and the gateway keeps running.
    gateway = binding_gateway(nats_only, tmp_path, auth=False)
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        nats = next(p for p in nats_only.procs if p.name == "nats")
        nats.popen.kill()
        nats.popen.wait()
        status, _, _ = await post_ota(f"{gateway.http_url}/xiaozhi/ota/", {"Device-Id": device.device_id, "Client-Id": device.client_id})
        assert status == 503
        assert await handshake(gateway.ws_url, {"Device-Id": device.device_id, "Client-Id": device.client_id}) == 503
        assert gateway.proc.popen.poll() is None  # still running
    finally:
        gateway.stop()


async def test_a_new_session_of_a_device_closes_the_older_one(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=True)
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        first = SimDevice(ws_url=gateway.ws_url, device_id=device.device_id, token=device.token)
        await first.connect()
        async with SimDevice(ws_url=gateway.ws_url, device_id=device.device_id, token=device.token) as second:
            assert await closed_with(first) == 4002
            assert second.ws.close_code is None and health(gateway)["sessions"] == 1
        await first.close()
    finally:
        gateway.stop()


async def test_a_new_session_on_another_gateway_closes_the_older_one(nats_only, tmp_path):
    first_gateway = binding_gateway(nats_only, tmp_path / "a", auth=True)
    second_gateway = binding_gateway(nats_only, tmp_path / "b", auth=True)
    try:
        device = await owned_device(first_gateway, nats_only.nats_url)
        stale = SimDevice(ws_url=first_gateway.ws_url, device_id=device.device_id, client_id=device.client_id, token=device.token)
        await stale.connect()
        async with SimDevice(ws_url=second_gateway.ws_url, device_id=device.device_id, client_id=device.client_id, token=device.token) as fresh:
            assert await closed_with(stale) == 4002
            assert fresh.ws.close_code is None and health(second_gateway)["sessions"] == 1
        await stale.close()
    finally:
        first_gateway.stop()
        second_gateway.stop()


async def test_an_unproved_session_closes_nobody(nats_only):
    """Without auth and binding anyone can claim a device id: such a session must not be a way
    to throw the real device off."""
    gateway = start_gateway(nats_only)
    try:
        mac = random_mac()
        async with SimDevice(ws_url=gateway.ws_url, device_id=mac) as real:
            async with SimDevice(ws_url=gateway.ws_url, device_id=mac, client_id=str(uuid.uuid4())) as other:
                await asyncio.sleep(1)
                assert real.ws.close_code is None and other.ws.close_code is None
                assert health(gateway)["sessions"] == 2
    finally:
        gateway.stop()


async def test_an_allow_listed_id_is_no_way_to_throw_the_device_off(nats_only):
    """An allow-listed device connects without a token, so a second session with its id proves
    nothing and must not close the device's own."""
    mac = random_mac()
    gateway = start_gateway(nats_only, auth__enabled="true", auth__key="k" * 32, auth__allowed_devices=json.dumps([mac]))
    try:
        async with SimDevice(ws_url=gateway.ws_url, device_id=mac) as real:
            async with SimDevice(ws_url=gateway.ws_url, device_id=mac, client_id=str(uuid.uuid4())) as other:
                await asyncio.sleep(1)
                assert real.ws.close_code is None and other.ws.close_code is None
                assert health(gateway)["sessions"] == 2
    finally:
        gateway.stop()


# ------------------------------------------------------------------ OTA: Host, CORS, ids, seen


async def test_ota_does_not_reflect_the_host_header_or_allow_any_origin(nats_only, tmp_path):
    folder = tmp_path / "firmware"
    folder.mkdir()
    (folder / "bread-compact-wifi_9.0.0.bin").write_bytes(b"\xe9" + b"x" * 100)
    # No public host configured: the one case where the request's Host could be used.
    gateway = start_gateway(nats_only, firmware_dir=str(folder), public_host="")
    try:
        body = json.dumps({"application": {"version": "1.0.0"}, "board": {"type": "bread-compact-wifi"}}).encode()
        headers = {"Device-Id": random_mac(), "Host": "evil.example:8003", "Origin": "http://evil.example"}
        status, answer, response_headers = await post_ota(f"{gateway.http_url}/xiaozhi/ota/", headers, body=body)
        assert status == 200
        assert "evil" not in answer["websocket"]["url"] and "evil" not in answer["firmware"]["url"], answer
        assert answer["websocket"]["url"].startswith(f"ws://{lan_ip()}:")
        assert answer["firmware"]["url"].startswith(f"http://{lan_ip()}:{gateway.http_port}/")
        # The request's Host is used when it names this machine.
        _, local, _ = await post_ota(f"{gateway.http_url}/xiaozhi/ota/", {"Device-Id": random_mac()}, body=body)
        assert local["firmware"]["url"].startswith(f"{gateway.http_url}/") and local["websocket"]["url"].startswith("ws://127.0.0.1:")
        assert not any(h.lower().startswith("access-control-") for h in response_headers), response_headers
    finally:
        gateway.stop()


async def test_ota_cors_only_for_the_configured_origins(nats_only):
    gateway = start_gateway(nats_only, ota_cors_origins=json.dumps(["http://console.local:8080"]))
    url = f"{gateway.http_url}/xiaozhi/ota/"
    try:
        async with aiohttp.ClientSession() as http:
            for origin, allowed in (("http://console.local:8080", True), ("http://evil.example", False), ("null", False)):
                async with http.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}) as response:
                    assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None), origin
                async with http.post(url, data=b"{}", headers={"Origin": origin, "Device-Id": random_mac()}) as response:
                    assert response.status == 200
                    assert response.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None), origin
    finally:
        gateway.stop()


async def test_ota_refuses_reserved_and_malformed_device_ids(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=False)
    try:
        for bad in ("web-4", "WEB-1", "default", "Default", "a" * 65, "aa bb", "aa/../bb", "<script>"):
            status, _, _ = await post_ota(f"{gateway.http_url}/xiaozhi/ota/", {"Device-Id": bad})
            assert status == 400, bad
            status, _, _ = await post_ota(f"{gateway.http_url}/xiaozhi/ota/activate", {"Device-Id": bad})
            assert status == 400, bad
    finally:
        gateway.stop()


async def test_only_the_bound_pair_updates_what_the_manager_shows(nats_only, tmp_path):
    gateway = binding_gateway(nats_only, tmp_path, auth=False)
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        device = await owned_device(gateway, nats_only.nats_url)
        seen = await nc.subscribe(Subjects().device_seen)
        await nc.flush()
        body = json.dumps({"application": {"version": "6.6.6"}, "board": {"type": "evil-board"}}).encode()
        await post_ota(f"{gateway.http_url}/xiaozhi/ota/", {"Device-Id": device.device_id, "Client-Id": str(uuid.uuid4())}, body=body)
        await device.ota()
        events = []
        while True:
            try:
                events.append(json.loads((await seen.next_msg(timeout=1)).data))
            except asyncio.TimeoutError:
                break
        # The bound pair's word arrives; the impersonator's evil board and firmware never do.
        assert any(e["device_id"] == device.device_id and e.get("firmware_version") == device.firmware_version for e in events), events
        assert not any(e.get("board") == "evil-board" or e.get("firmware_version") == "6.6.6" for e in events), events
    finally:
        await nc.close()
        gateway.stop()
