"""Notices and reboots from the manager (issue 15), through NATS to the gateway holding the
device's session, on SQLite, MariaDB and PostgreSQL: the owner's notice reaches the simulated
device's screen as the firmware's ``alert`` (Chinese text unescaped), a reboot is the firmware's
``system`` command and the device goes away; another user gets 404, an offline device 409, bad
input 422, too many commands 429."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import start_gateway, start_nats
from tests.manager.conftest import ADMIN_PASSWORD, Api, start_manager
from tests.manager.test_api import bind_new_device, new_user
from xiaozhi.sim import SimDevice
from xiaozhi.stack import Stack

pytestmark = pytest.mark.e2e


async def _online(api, device_id: str) -> bool:
    for _ in range(50):
        if api.call("GET", f"/api/devices/{device_id}")[1]["online"]:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_the_owner_sends_a_notice_and_reboots_the_device(manager):
    owner = new_user(manager, "nina")
    stranger = new_user(manager, "oscar")
    device = await bind_new_device(manager, owner, alias="hall")
    assert await device.activate(polls=2, wait_pending_s=0.1)
    path = f"/api/devices/{device.device_id}"

    # Offline (no session anywhere): a clear 409, for both commands.
    status, problem = owner.call("POST", f"{path}/notice", {"message": "hello"})
    assert status == 409 and "offline" in problem["detail"], problem
    assert owner.call("POST", f"{path}/reboot")[0] == 409

    async with SimDevice(ws_url=manager.ws_url, device_id=device.device_id) as live:
        assert await _online(owner, device.device_id)
        status, sent = owner.call("POST", f"{path}/notice", {"message": "你好，晚饭好了", "status": "通知", "emotion": "happy"})
        assert status == 200 and sent == {"delivered": True, "session_id": live.session_id}, sent
        frame = await live.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "alert", timeout=5)
        assert frame is not None and frame.message == {"session_id": live.session_id, "type": "alert", "status": "通知", "message": "你好，晚饭好了", "emotion": "happy"}
        assert live.screen == {"status": "通知", "message": "你好，晚饭好了", "emotion": "happy"}
        # Defaults: a status and the neutral face (the firmware ignores an alert missing either).
        assert owner.call("POST", f"{path}/notice", {"message": "  the door is open  "})[0] == 200
        for _ in range(50):
            if len(live.alerts) == 2:
                break
            await asyncio.sleep(0.05)
        assert live.alerts[1] == {"status": "Notice", "message": "the door is open", "emotion": "neutral"}

        # Bad input: 422, and nothing reaches the device.
        for bad in ({"message": ""}, {"message": "   "}, {"message": "x" * 301}, {"message": "hi", "emotion": "dizzy"},
                    {"message": "hi", "status": "s" * 33}, {"message": "a\x00b"}, {}, {"message": 5}):
            status, problem = owner.call("POST", f"{path}/notice", bad)
            assert status == 422, (bad, status, problem)
        # Another user's device is no device: 404, as every device route.
        assert stranger.call("POST", f"{path}/notice", {"message": "pwned"})[0] == 404
        assert stranger.call("POST", f"{path}/reboot")[0] == 404
        assert owner.call("POST", "/api/devices/aa:bb:cc:00:00:00/notice", {"message": "hi"})[0] == 404
        await asyncio.sleep(0.3)
        assert len(live.alerts) == 2 and all(a["message"] != "pwned" for a in live.alerts)

        # Reboot: the firmware's system command; the device drops its socket, as it restarts.
        status, sent = owner.call("POST", f"{path}/reboot")
        assert status == 200 and sent["delivered"] is True, sent
        frame = await live.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "system", timeout=5)
        assert frame is not None and frame.message == {"session_id": live.session_id, "type": "system", "command": "reboot"}
        for _ in range(50):
            if live.closed:
                break
            await asyncio.sleep(0.05)
        assert live.rebooted and live.closed
    # The gateway saw the socket go: offline, and a notice now is a 409.
    for _ in range(50):
        if not owner.call("GET", path)[1]["online"]:
            break
        await asyncio.sleep(0.1)
    assert owner.call("GET", path)[1]["online"] is False
    assert owner.call("POST", f"{path}/notice", {"message": "still there?"})[0] == 409

    # Logged with the device and the session.
    sent_lines = [json.loads(line) for line in manager.log("gateway").splitlines() if "owner's command sent" in line]
    assert {(str(line.get("device_id")).lower(), line.get("command")) for line in sent_lines} >= {(device.device_id.lower(), "notice"), (device.device_id.lower(), "reboot")}, sent_lines[-3:]
    assert all(line.get("session_id") == live.session_id for line in sent_lines if str(line.get("device_id")).lower() == device.device_id.lower())
    asked = [json.loads(line) for line in manager.log("manager").splitlines() if '"device command"' in line]
    mine = [(a["command"], a["delivered"]) for a in asked if a.get("device_id") == device.device_id.lower()]
    assert ("notice", True) in mine and ("reboot", True) in mine and ("notice", False) in mine, mine
    assert all("你好" not in line for line in manager.log("manager").splitlines() if '"device command"' in line)  # no message text in the log


async def test_with_two_gateways_the_one_holding_the_device_answers(manager, tmp_path):
    """Every gateway hears the command; the one without the device stays silent."""
    owner = new_user(manager, "quinn")
    device = await bind_new_device(manager, owner)
    assert await device.activate(polls=2, wait_pending_s=0.1)
    other = start_gateway(manager.stack, binding="true", binding_db=str(tmp_path / "bindings.db"))
    try:
        async with SimDevice(ws_url=other.ws_url, device_id=device.device_id) as live:
            assert await _online(owner, device.device_id)
            status, sent = owner.call("POST", f"/api/devices/{device.device_id}/notice", {"message": "on the second gateway", "emotion": "cool"})
            assert status == 200 and sent["session_id"] == live.session_id, sent
            assert await live.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "alert", timeout=5) is not None
            assert live.screen["message"] == "on the second gateway"
    finally:
        other.stop()


async def test_commands_are_limited_per_device(manager):
    owner = new_user(manager, "petra")
    device = await bind_new_device(manager, owner)
    path = f"/api/devices/{device.device_id}/notice"
    # Every attempt counts (offline ones too): device_commands_per_minute (10), then 429.
    statuses = [owner.call("POST", path, {"message": f"n{i}"})[0] for i in range(10)]
    assert statuses == [409] * 10
    status, problem = owner.call("POST", path, {"message": "one more"})
    assert status == 429 and "per minute" in problem["detail"], problem


def test_without_nats_a_command_is_503(tmp_path):
    """NATS away: the gateways cannot be asked, which is not the device being offline."""
    stack = Stack(env={"XZ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}, log_dir=tmp_path / "logs")
    url = f"sqlite:///{tmp_path / 'manager.db'}"
    try:
        start_nats(stack, tmp_path)
        base, _proc = start_manager(stack, url)
        admin = Api(base).login("admin", ADMIN_PASSWORD)
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO devices (device_id, owner_id, auto_upgrade, bound_at) SELECT 'aa:bb:cc:dd:ee:15', id, 1, CURRENT_TIMESTAMP FROM users WHERE username = 'admin'"))
        engine.dispose()
        assert admin.call("POST", "/api/devices/aa:bb:cc:dd:ee:15/notice", {"message": "hi"})[0] == 409  # NATS up, no gateway
        nats = next(p for p in stack.procs if p.name == "nats")
        nats.popen.send_signal(signal.SIGKILL)
        nats.popen.wait(10)
        stack.procs.remove(nats)
        for path, body in (("notice", {"message": "hi"}), ("reboot", None)):
            status, problem = admin.call("POST", f"/api/devices/aa:bb:cc:dd:ee:15/{path}", body)
            assert status == 503 and "NATS" in problem["detail"], (path, status, problem)
    finally:
        stack.stop()
