"""NATS authorisation against a real nats-server running the generated users config: the whole
pipeline works with one user per service, and each user is refused what is not its job."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS

from tests.conftest import fixture_wav, nats_with_users, try_as, violation
from xiaozhi.sim import SimDevice, read_wav
from xiaozhi.stack import SERVICES, Stack, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    with nats_with_users(tmp) as (url, passwords):
        # keep_audio: the ASR writes each utterance into xz_audio with its own user.
        stack = Stack(
            env={"XZ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1", "XZ_GATEWAY__HOST": "127.0.0.1", "XZ_GATEWAY__BINDING_DB": str(tmp / "b.sqlite"), "XZ_ASR__KEEP_AUDIO": "true"},
            log_dir=tmp / "logs",
        )
        stack.nats_url = url
        try:
            ws_port = free_port()
            procs = []
            manager_port = free_port()
            for name in SERVICES + ("manager",):
                env = {"XZ_NATS__USER": name, "XZ_NATS__PASSWORD": passwords[name]}
                if name == "gateway":
                    env.update({"XZ_GATEWAY__WS_PORT": str(ws_port), "XZ_GATEWAY__HTTP_PORT": str(free_port())})
                if name == "manager":
                    env.update({"XZ_MANAGER__HOST": "127.0.0.1", "XZ_MANAGER__PORT": str(manager_port), "XZ_MANAGER__DATABASE_URL": f"sqlite:///{tmp / 'manager.db'}", "XZ_MANAGER__ADMIN_PASSWORD": "admin-password"})
                procs.append(stack.start_service(name, free_port(), env))
            stack.wait_healthy(procs, timeout=240)
            stack.manager_url = f"http://127.0.0.1:{manager_port}"  # type: ignore[attr-defined]
            yield url, passwords, f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/", stack
        finally:
            stack.stop()


async def test_the_pipeline_works_with_one_user_per_service(secured):
    url, passwords, ws_url, stack = secured
    async with SimDevice(ws_url=ws_url) as device:
        report = await device.speak(read_wav(fixture_wav("en_what_time.wav")), reply_timeout=60)
        assert report.error is None and report.stt and "time" in report.stt.lower(), report
        assert report.frames > 0
        typed = await device.type_text("Tell me a short joke.")
        assert typed.error is None and typed.frames > 0, typed
        # The manager runs as its own NATS user too (it heard the gateway's and the LLM's
        # events of this turn: any refused subscription would be in its log, checked below).
        from tests.manager.conftest import Api

        api = Api(stack.manager_url).login("admin", "admin-password")
        assert api.call("GET", "/api/devices") == (200, [])
    # The ASR kept the utterance with its own user (object store xz_audio, made by nats-setup).
    asr_log = (stack.log_dir / "asr.log").read_text()
    assert "utterance audio not kept" not in asr_log
    # No service ran into a permission it lacked, nor found a stream or bucket missing.
    for name in SERVICES + ("manager",):
        text = (stack.log_dir / f"{name}.log").read_text()
        assert "Permissions Violation" not in text, (name, [line for line in text.splitlines() if "Permissions" in line][:3])
        assert "nats-setup" not in text, (name, [line for line in text.splitlines() if "nats-setup" in line][:3])


async def test_each_user_is_refused_what_is_not_its_job(secured):
    url, passwords, _ws, _stack = secured
    refused_publish = {
        "gateway": ["xz.tts.s1", "xz.asr.s1", "xz.out.s1", "xz.tools.call.get_time"],
        "vad": ["xz.llm.s1", "xz.tts.s1", "xz.audio.s1", "xz.ctl.s1"],
        "asr": ["xz.tts.s1", "xz.audio.s1", "xz.ctl.s1"],
        "llm": ["xz.asr.s1", "xz.audio.s1", "xz.say.s1"],
        "tts": ["xz.llm.s1", "xz.tts.s1", "xz.audio.s1"],
        "tools": ["xz.llm.s1", "xz.audio.s1", "xz.ctl.s1"],
        "manager": ["xz.llm.s1", "xz.audio.s1", "xz.out.s1", "xz.history", "xz.registry.seen"],
    }
    for user, subjects in refused_publish.items():
        for subject in subjects:
            errors = await try_as(url, user, passwords[user], lambda nc, s=subject: nc.publish(s, b"x"))
            assert violation(errors), (user, subject, errors)
    refused_subscribe = {"tts": "xz.audio.*", "asr": "xz.out.*", "tools": "xz.ctl.*", "gateway": "xz.tts.*"}
    for user, subject in refused_subscribe.items():
        errors = await try_as(url, user, passwords[user], lambda nc, s=subject: nc.subscribe(s))
        assert violation(errors), (user, subject, errors)
    # Nobody may delete a work queue, nor create or change a stream: the admin makes them.
    errors = await try_as(url, "asr", passwords["asr"], lambda nc: nc.publish("$JS.API.STREAM.DELETE.XZ_ASR", b""))
    assert violation(errors)
    for user in SERVICES + ("manager",):
        for subject in ("$JS.API.STREAM.CREATE.EVIL", "$JS.API.STREAM.UPDATE.XZ_LLM"):
            errors = await try_as(url, user, passwords[user], lambda nc, s=subject: nc.publish(s, b"{}"))
            assert violation(errors), (user, subject, errors)
    # What a user needs is allowed (no violation): the gateway sends audio and claims VAD.
    errors = await try_as(url, "gateway", passwords["gateway"], lambda nc: nc.publish("xz.audio.s1", b"x"))
    assert not violation(errors), errors
    # The manager asks the gateways who is online and claims devices by code.
    for subject in ("xz.registry.online", "xz.gateway.bind"):
        errors = await try_as(url, "manager", passwords["manager"], lambda nc, s=subject: nc.publish(s, b"{}"))
        assert not violation(errors), (subject, errors)


async def test_unknown_users_and_wrong_passwords_cannot_connect(secured):
    url, passwords, _ws, _stack = secured
    for user, password in (("gateway", "wrong"), ("nobody", "x")):
        nc = NATS()
        with pytest.raises(Exception):
            await nc.connect(url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    nc = NATS()
    with pytest.raises(Exception):
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
