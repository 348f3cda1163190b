"""The owner's notice and reboot in the gateway's and the manager's own code, without processes:
the gateway answers for the newest session of the device it holds and for nothing else, takes
any request without raising, and the manager tells "offline" from "NATS away"."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server import Gateway
from manager.service import NatsCommander
from shared.settings import Settings


class FakeSession:
    def __init__(self, device_id: str, session_id: str, at: float, ready: bool = True, fails: bool = False) -> None:
        self.device_id, self.session_id, self.connected_at, self.ready, self.fails = device_id, session_id, at, ready, fails
        self.sent: list[tuple[str, dict]] = []

    async def send_command(self, command: str, fields: dict) -> None:
        if self.fails:
            raise ConnectionError("gone")
        self.sent.append((command, fields))


class FakeMsg:
    def __init__(self, body: object, reply: str = "_INBOX.x") -> None:
        self.data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.reply = reply
        self.answers: list[dict] = []

    async def respond(self, data: bytes) -> None:
        self.answers.append(json.loads(data))


def gateway_with(*sessions: FakeSession) -> Gateway:
    gateway = Gateway(Settings())
    gateway.sessions = set(sessions)  # type: ignore[arg-type]
    return gateway


NOTICE = {"device_id": "AA:BB:CC:DD:EE:01", "command": "notice", "status": "通知", "message": "你好", "emotion": "happy"}


def test_the_newest_ready_session_of_the_device_gets_it_and_the_gateway_answers() -> None:
    old, new = FakeSession("aa:bb:cc:dd:ee:01", "s-old", 1.0), FakeSession("aa:bb:cc:dd:ee:01", "s-new", 2.0)
    starting = FakeSession("aa:bb:cc:dd:ee:01", "s-hello-pending", 3.0, ready=False)
    other = FakeSession("aa:bb:cc:dd:ee:02", "s-other", 4.0)
    msg = FakeMsg(NOTICE)
    asyncio.run(gateway_with(old, new, starting, other)._on_command(msg))
    assert new.sent == [("notice", {"status": "通知", "message": "你好", "emotion": "happy"})]
    assert old.sent == starting.sent == other.sent == []
    assert msg.answers == [{"delivered": True, "device_id": "aa:bb:cc:dd:ee:01", "session_id": "s-new"}]
    reboot = FakeMsg({"device_id": "aa:bb:cc:dd:ee:02", "command": "reboot"})
    asyncio.run(gateway_with(other)._on_command(reboot))
    assert other.sent == [("reboot", {})] and reboot.answers[0]["session_id"] == "s-other"


@pytest.mark.parametrize("sessions", [[], [FakeSession("aa:bb:cc:dd:ee:01", "s", 1.0, ready=False)], [FakeSession("aa:bb:cc:dd:ee:01", "s", 1.0, fails=True)]])
def test_without_a_ready_session_the_gateway_stays_silent(sessions) -> None:
    msg = FakeMsg(NOTICE)
    asyncio.run(gateway_with(*sessions)._on_command(msg))
    assert msg.answers == []


@pytest.mark.parametrize("body", [
    b"not json", [], {"command": "notice"}, {"device_id": "aa:bb:cc:dd:ee:01", "command": "format"},
    {**NOTICE, "emotion": 3}, {**NOTICE, "message": ""}, {**NOTICE, "message": "x" * 1001}, {"device_id": "", "command": "reboot"},
    {"device_id": ["aa:bb:cc:dd:ee:01"], "command": "reboot"},
])
def test_malformed_requests_are_dropped_unanswered(body) -> None:
    session = FakeSession("aa:bb:cc:dd:ee:01", "s", 1.0)
    msg = FakeMsg(body)
    asyncio.run(gateway_with(session)._on_command(msg))
    assert msg.answers == [] and session.sent == []


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
command_like = st.dictionaries(st.sampled_from(["device_id", "command", "status", "message", "emotion"]), json_values | st.sampled_from(["aa:bb:cc:dd:ee:01", "notice", "reboot"]), max_size=5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(json_values | command_like)
def test_any_request_is_taken_without_raising(body) -> None:
    session = FakeSession("aa:bb:cc:dd:ee:01", "s", 1.0)
    msg = FakeMsg(body)
    asyncio.run(gateway_with(session)._on_command(msg))
    for command, fields in session.sent:
        assert command in ("notice", "reboot") and all(isinstance(v, str) and v for v in fields.values())


class FakeNats:
    def __init__(self, connected: bool = True, raises: Exception | None = None, reply: bytes = b"") -> None:
        self.is_connected, self.raises, self.reply = connected, raises, reply
        self.requests: list[tuple[str, dict]] = []

    async def request(self, subject: str, data: bytes, timeout: float):  # noqa: ANN201
        self.requests.append((subject, json.loads(data)))
        if self.raises is not None:
            raise self.raises

        class Reply:
            pass

        answer = Reply()
        answer.data = self.reply  # type: ignore[attr-defined]
        return answer


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_the_manager_tells_offline_from_nats_away(loop) -> None:
    from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

    body = {"command": "notice", "status": "Notice", "message": "你好", "emotion": "neutral"}
    up = FakeNats(reply=b'{"delivered": true, "device_id": "aa:bb:cc:dd:ee:01", "session_id": "s1"}')
    assert NatsCommander(loop, up, "xz.gateway.command").command("aa:bb:cc:dd:ee:01", body)["session_id"] == "s1"
    assert up.requests == [("xz.gateway.command", {"device_id": "aa:bb:cc:dd:ee:01", **body})]
    for offline in (FakeNats(raises=NatsTimeout()), FakeNats(raises=NoRespondersError()), FakeNats(reply=b'{"delivered": false}'), FakeNats(reply=b"[]")):
        assert NatsCommander(loop, offline, "xz.gateway.command").command("aa:bb:cc:dd:ee:01", body) == {"delivered": False}
    for away in (FakeNats(connected=False), FakeNats(raises=ConnectionError("closed")), FakeNats(reply=b"not json")):
        assert "error" in NatsCommander(loop, away, "xz.gateway.command").command("aa:bb:cc:dd:ee:01", body)
