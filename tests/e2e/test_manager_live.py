"""Live configuration through the manager: a device bound in the manager gets its agent, and a
role prompt changed in the manager during a live session is the one the very next turn uses,
with no service restarted. Real processes: the pipeline, a gateway holding activation codes,
the manager; the device speaks real speech in real time."""

from __future__ import annotations

import asyncio
import hashlib
import re

import pytest

from tests.conftest import fixture_wav, start_gateway
from tests.e2e.test_memory_agents import llm_lines
from tests.manager.conftest import ADMIN_PASSWORD, Api, start_manager
from xiaozhi.sim import SimDevice, read_wav

pytestmark = pytest.mark.e2e


def prompts(pipeline, session_id: str) -> list[dict]:
    return llm_lines(pipeline, session_id, "prompt")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.fixture
def manager_on_pipeline(pipeline, tmp_path):
    binding = start_gateway(pipeline.stack, binding="true", binding_db=str(tmp_path / "bindings.db"))
    base, proc = start_manager(pipeline.stack, f"sqlite:///{tmp_path / 'manager.db'}")
    try:
        yield Api(base).login("admin", ADMIN_PASSWORD), binding
    finally:
        proc.popen.terminate()
        proc.popen.wait(15)
        binding.stop()


async def test_a_role_prompt_changed_in_the_manager_applies_to_the_next_turn(pipeline, manager_on_pipeline):
    api, binding = manager_on_pipeline
    first_role = "You are {name}, a cheerful pirate. Answer like a pirate."
    _, agent = api.call("POST", "/api/agents", {"name": "Captain Pete", "role_prompt": first_role})

    device = SimDevice(ota_url=f"{binding.http_url}/xiaozhi/ota/")
    code = (await device.ota())["activation"]["code"]
    status, bound = api.call("POST", "/api/devices/bind", {"code": code, "agent_id": agent["id"]})
    assert status == 201 and bound["live_config"], bound
    assert await device.activate(polls=2, wait_pending_s=0.1)

    # The pipeline's own processes (other tests' extra gateways have come and gone).
    running = {p.popen.pid: p for p in pipeline.stack.procs if p.alive() and p.name in ("llm", "gateway", "tts", "asr", "vad")}
    speech = read_wav(fixture_wav("en_what_time.wav"))
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device.device_id) as live:
        report = await live.speak(speech)
        assert report.error is None and report.stt and report.frames > 0, report
        first = prompts(pipeline, live.session_id)
        assert first and first[-1]["agent"] == "Captain Pete" and first[-1]["role_sha"] == sha(first_role)

        # The owner edits the agent in the manager while the session stays open.
        second_role = "You are {name}, a retired pirate who now grows tomatoes."
        status, _ = api.call("PUT", f"/api/agents/{agent['id']}", {"name": "Old Pete", "role_prompt": second_role})
        assert status == 200

        # The manager sees the session (asking the gateways).
        listed = {d["device_id"]: d for d in api.call("GET", "/api/devices")[1]}
        assert listed[device.device_id.lower()]["online"] is True

        report = await live.speak(speech)
        assert report.error is None and report.stt and report.frames > 0, report
        after = prompts(pipeline, live.session_id)
        assert len(after) == len(first) + 1
        assert after[-1]["agent"] == "Old Pete" and after[-1]["role_sha"] == sha(second_role)
    # Offline once the session closed; both turns are in the device's chat history, newest first.
    for _ in range(50):
        state = api.call("GET", f"/api/devices/{device.device_id}")[1]
        history = api.call("GET", f"/api/devices/{device.device_id}/history")[1]
        if not state["online"] and len(history) >= 4:
            break
        await asyncio.sleep(0.1)
    assert state["online"] is False and state["last_seen"]
    assert [h["role"] for h in history] == ["assistant", "user", "assistant", "user"], history
    assert history[1]["text"] == report.stt and history[0]["text"]
    assert {h["session_id"] for h in history} == {live.session_id}
    # Nothing was restarted for it.
    assert running and all(p.alive() for p in running.values()), {p.name: p.alive() for p in running.values()}


async def test_an_agents_speech_model_and_language_set_in_the_manager_apply_to_the_next_turn(pipeline, manager_on_pipeline):
    """Mandarin from a device whose agent has no speech model set is heard by the default
    English-only Whisper; the owner picks the multilingual model and Mandarin in the manager, and
    the very next spoken turn is transcribed in Mandarin, in the same session."""
    api, binding = manager_on_pipeline
    _, agent = api.call("POST", "/api/agents", {"name": "Xiaoming"})
    device = SimDevice(ota_url=f"{binding.http_url}/xiaozhi/ota/")
    code = (await device.ota())["activation"]["code"]
    assert api.call("POST", "/api/devices/bind", {"code": code, "agent_id": agent["id"]})[0] == 201
    assert await device.activate(polls=2, wait_pending_s=0.1)
    speech = read_wav(fixture_wav("zh_what_time.wav"))
    cjk = re.compile(r"[\u4e00-\u9fff]")
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device.device_id) as live:
        report = await live.speak(speech)
        # tiny.en writes English (or nothing it trusts) for Mandarin.
        assert report.error is None and not cjk.search(report.stt or ""), report
        assert api.call("PUT", f"/api/agents/{agent['id']}", {"name": "Xiaoming", "asr_model": "base", "language": "zh"})[0] == 200
        report = await live.speak(speech)
        assert report.error is None and report.frames > 0, report
        assert report.stt and cjk.search(report.stt) and "点" in report.stt, report.stt  # 现在几点了
