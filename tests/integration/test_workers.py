"""Each worker as its own process against a real nats-server, driven over its NATS subjects."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from llm_svc.backends import packaged_gguf
from shared.audio import decode_packets, encode_pcm
from shared.messages import (
    AudioFrameMeta,
    Control,
    OutEvent,
    SentenceJob,
    ToolCall,
    ToolList,
    ToolResult,
    UserTurn,
    Utterance,
    VadClaim,
    VadClaimAck,
    new_turn_id,
)
from shared.subjects import Subjects
from tests.conftest import collect_llm_turn, fixture_wav, log_records, start
from xiaozhi.sim import read_wav
from xiaozhi.stack import free_port, wait_tcp

S = Subjects()


async def test_asr_worker_transcribes_and_survives_garbage(nats_only, nc):
    start(nats_only, "asr")
    session = "s-asr"
    sub = await nc.subscribe(S.llm(session))
    await nc.publish(S.asr(session), b"\x00\x00\x00\xffgarbage")
    packets = encode_pcm(read_wav(fixture_wav("en_what_time.wav")), 16000, 60)
    turn_id = new_turn_id()
    await nc.publish(S.asr(session), Utterance(session_id=session, turn_id=turn_id, device_id="d1").pack(packets))
    msg = await sub.next_msg(timeout=30)
    turn = UserTurn.decode(msg.data)
    assert turn.turn_id == turn_id and turn.device_id == "d1" and turn.source == "asr"
    assert turn.text.lower().rstrip("?.!") == "what time is it"


async def test_tts_worker_streams_numbered_opus_frames(nats_only, nc):
    start(nats_only, "tts")
    session, turn_id = "s-tts", new_turn_id()
    sub = await nc.subscribe(S.out(session))
    await nc.publish(S.tts(session), SentenceJob(session_id=session, turn_id=turn_id, seq=3, text="Hello there, how are you today?").encode())
    frames: list[bytes] = []
    events: list[OutEvent] = []
    while not events or events[-1].kind != "sentence_end":
        msg = await sub.next_msg(timeout=30)
        meta = AudioFrameMeta.from_headers(msg.headers)
        if meta:
            assert (meta.turn_id, meta.seq, meta.index) == (turn_id, 3, len(frames))
            frames.append(msg.data)
        else:
            events.append(OutEvent.decode(msg.data))
    assert [e.kind for e in events] == ["sentence_start", "sentence_end"]
    assert events[0].text == "Hello there, how are you today?"
    assert events[1].frames == len(frames) and len(frames) > 10
    pcm = decode_packets(frames, 24000)
    assert len(pcm) == len(frames) * 1440  # exactly 60 ms per frame at 24 kHz
    assert np.abs(pcm.astype(np.int32)).mean() > 100


async def test_tools_worker_lists_and_calls(nats_only, nc):
    start(nats_only, "tools")
    listing = ToolList.decode((await nc.request(S.tools_list, b"", timeout=5)).data)
    assert "get_time" in [t.name for t in listing.tools]
    result = ToolResult.decode((await nc.request(S.tool("get_time"), ToolCall(name="get_time").encode(), timeout=5)).data)
    assert result.ok and result.action == "response" and str(time.localtime().tm_year) in result.text
    unknown = ToolResult.decode((await nc.request(S.tool("nope"), ToolCall(name="nope").encode(), timeout=5)).data)
    assert not unknown.ok and unknown.action == "error"
    garbage = ToolResult.decode((await nc.request(S.tool("get_time"), b"{oops", timeout=5)).data)
    assert not garbage.ok and "malformed" in garbage.text


async def test_vad_worker_cuts_utterances_auto_and_manual(nats_only, nc):
    start(nats_only, "vad")
    session = "s-vad"
    asr = await nc.subscribe(S.asr(session))
    ack = VadClaimAck.decode((await nc.request(S.vad_claim, VadClaim(session_id=session, device_id="d2").encode(), timeout=5)).data)
    assert ack.session_id == session and ack.worker_id
    speech = read_wav(fixture_wav("en_what_time.wav"))
    silence = np.zeros(16000 * 2, dtype=np.int16)
    # Auto mode: speech then silence ends the turn by itself.
    await nc.publish(S.ctl(session), Control(session_id=session, kind="listen_start", mode="auto").encode())
    for packet in encode_pcm(np.concatenate([silence[:8000], speech, silence]), 16000, 60):
        await nc.publish(S.audio(session), packet)
    meta, packets = Utterance.unpack((await asr.next_msg(timeout=10)).data)
    assert meta.session_id == session and meta.device_id == "d2"
    assert 1.0 <= len(packets) * 0.06 <= 3.0, len(packets)
    # Silence alone is no utterance.
    for packet in encode_pcm(silence, 16000, 60):
        await nc.publish(S.audio(session), packet)
    with pytest.raises(asyncio.TimeoutError):
        await asr.next_msg(timeout=1.5)
    # Manual mode: everything until listen stop, however long the silence.
    await nc.publish(S.ctl(session), Control(session_id=session, kind="listen_start", mode="manual").encode())
    for packet in encode_pcm(np.concatenate([speech, silence]), 16000, 60):
        await nc.publish(S.audio(session), packet)
    with pytest.raises(asyncio.TimeoutError):
        await asr.next_msg(timeout=1.0)
    await nc.publish(S.ctl(session), Control(session_id=session, kind="listen_stop").encode())
    meta, packets = Utterance.unpack((await asr.next_msg(timeout=10)).data)
    assert len(packets) == len(encode_pcm(np.concatenate([speech, silence]), 16000, 60))


@pytest.fixture
def llama_server(tmp_path):
    """A real OpenAI-compatible server: llama-cpp-python's, with the packaged model."""
    port = free_port()
    log = open(tmp_path / "llama_server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", packaged_gguf(), "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2", "--model_alias", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        assert wait_tcp("127.0.0.1", port, 60), (tmp_path / "llama_server.log").read_text()[-2000:]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_llm_worker_with_openai_compatible_server(nats_only, llama_server, nc):
    # No emoji list in the prompt: the tiny model sometimes answers with an emoji alone.
    start(nats_only, "llm", {"XZ_LLM__BACKEND": "openai", "XZ_LLM__BASE_URL": llama_server, "XZ_LLM__MODEL": "smollm2", "XZ_LLM__EMOJI_PROMPT": "false"})
    session, turn_id = "s-llm", new_turn_id()
    events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=turn_id, text="Say hello to my friend Anna."))
    kinds = [e.kind for e in events]
    assert kinds[0] == "stt" and events[0].text == "Say hello to my friend Anna."
    assert "emotion" in kinds and kinds[-1] == "turn_end"
    assert jobs, "no sentences"
    assert [j.seq for j in jobs] == list(range(len(jobs)))
    assert events[-1].sentences == len(jobs)
    assert all(j.turn_id == turn_id and j.text.strip() for j in jobs)
    assert jobs[0].text != "Sorry, I could not think of an answer just now."  # the model's own words
    # History: the second turn of the session is answered with the first in context.
    events2, jobs2 = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="Thanks!"))
    assert events2[-1].kind == "turn_end" and jobs2


async def test_llm_worker_speaks_an_error_when_backend_is_down(nats_only, nc):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    start(nats_only, "llm", {"XZ_LLM__BACKEND": "openai", "XZ_LLM__BASE_URL": dead, "XZ_LLM__ERROR_REPLY": "Sorry, my brain is offline."})
    session = "s-llm-down"
    events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="Hello?"))
    assert [j.text for j in jobs] == ["Sorry, my brain is offline."]
    assert events[-1].kind == "turn_end" and events[-1].sentences == 1


@pytest.mark.parametrize("mode", ["function_call", "intent_llm", "none"])
async def test_intent_modes(nats_only, mode, nc):
    """function_call and intent_llm reach get_time for 'What time is it?'; none is plain chat."""
    start(nats_only, "tools")
    start(nats_only, "llm", {"XZ_LLM__INTENT_MODE": mode})
    session = f"s-intent-{mode}"
    events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="What time is it?"))
    assert events[-1].kind == "turn_end" and jobs
    spoke_time = bool(re.match(r"It is \d{1,2}:\d\d [AP]M on \w+day, ", jobs[0].text))
    assert spoke_time == (mode != "none"), jobs[0].text


async def test_an_agents_model_is_what_the_openai_compatible_server_is_asked_for(nats_only, llama_server, nc, tmp_path):
    """The manager's per-agent LLM model reaches the server (a real llama-cpp-python server,
    which answers under the model name it was asked for); other devices get the configured one."""
    from shared.agents import AgentConfig, save_agent

    proc = start(nats_only, "llm", {"XZ_LLM__BACKEND": "openai", "XZ_LLM__BASE_URL": llama_server, "XZ_LLM__MODEL": "smollm2", "XZ_LLM__TOOLS": "false"})
    kv = await nc.jetstream().key_value("xz_agents")
    await save_agent(kv, "aa:bb:cc:00:00:01", AgentConfig(name="Pete", llm_model="smollm2-pirate"))
    for device_id, session in (("aa:bb:cc:00:00:01", "s-model-1"), ("aa:bb:cc:00:00:02", "s-model-2")):
        events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="Say hi.", device_id=device_id))
        assert events[-1].kind == "turn_end" and jobs
    replies = {r.get("session_id"): r.get("model") for r in log_records((nats_only.log_dir / "llm.log").read_text(), "reply")}
    assert replies.get("s-model-1") == "smollm2-pirate", replies
    assert replies.get("s-model-2") == "smollm2", replies
    assert proc.alive()


async def test_an_agent_chooses_its_llm_backend(nats_only, llama_server, nc):
    """llm.providers: the worker's default is the embedded llama.cpp; an agent that names the
    "remote" backend (a real OpenAI-compatible server) is answered by it, started at its first
    turn; an agent naming a backend the worker lacks gets the default, counted."""
    import json
    import urllib.request

    from shared.agents import AgentConfig, save_agent

    providers = {"remote": {"backend": "openai", "base_url": llama_server, "model": "smollm2-remote"}}
    port = free_port()
    proc = nats_only.start_service("llm", port, {"XZ_LLM__TOOLS": "false", "XZ_LLM__PROVIDERS": json.dumps(providers)})
    nats_only.wait_healthy([proc], timeout=120)
    kv = await nc.jetstream().key_value("xz_agents")
    await save_agent(kv, "dev-remote", AgentConfig(name="Remy", llm_backend="remote"))
    await save_agent(kv, "dev-ghost", AgentConfig(name="Ghost", llm_backend="gpt-9"))
    for device_id in ("dev-remote", "dev-local", "dev-ghost"):
        session = f"s-{device_id}"
        events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="Say hi.", device_id=device_id))
        assert events[-1].kind == "turn_end" and jobs and jobs[0].text != "Sorry, I could not think of an answer just now.", jobs
    replies = {r.get("session_id"): r.get("model") for r in log_records((nats_only.log_dir / "llm.log").read_text(), "reply")}
    # The remote server names the model it answered as; the embedded model names none.
    assert replies == {"s-dev-remote": "smollm2-remote", "s-dev-local": None, "s-dev-ghost": None}, replies
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as response:
        assert json.loads(response.read())["backends"] == ["default", "remote"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        assert re.search(r'xz_errors_total\{kind="unknown_backend",service="llm"\} 1\.0', response.read().decode())


async def test_an_agent_chooses_its_asr_model(nats_only, nc):
    """The worker runs tiny.en (English only); a device whose agent chose the multilingual
    "base" (one of asr.models) and Mandarin is transcribed in Mandarin by it, loaded at its first
    utterance; a device without an agent, or whose agent names a model not allowed, stays on
    tiny.en."""
    from shared.agents import AgentConfig, save_agent

    start(nats_only, "asr")
    kv = await nc.jetstream().create_key_value(bucket="xz_agents")
    await save_agent(kv, "zh-base", AgentConfig(asr_model="base", language="zh"))
    await save_agent(kv, "zh-large", AgentConfig(asr_model="large-v3", language="zh"))
    packets = encode_pcm(read_wav(fixture_wav("zh_what_time.wav")), 16000, 60)
    texts = {}
    for device_id in ("zh-base", "no-agent", "zh-large"):
        session = f"s-asr-model-{device_id}"
        sub = await nc.subscribe(S.llm(session))
        await nc.publish(S.asr(session), Utterance(session_id=session, turn_id=new_turn_id(), device_id=device_id).pack(packets))
        texts[device_id] = UserTurn.decode((await sub.next_msg(timeout=90)).data).text
    cjk = re.compile(r"[\u4e00-\u9fff]")
    assert cjk.search(texts["zh-base"]) and "几点" in texts["zh-base"], texts
    assert not cjk.search(texts["no-agent"]) and not cjk.search(texts["zh-large"]), texts


async def test_asr_uses_the_language_of_the_devices_agent(nats_only, nc):
    """A multilingual model configured for English transcribes a device whose agent (set in the
    manager) speaks Mandarin in Mandarin; a device without an agent stays in English."""
    from shared.agents import AgentConfig, save_agent

    start(nats_only, "asr", {"XZ_ASR__MODEL": "base", "XZ_ASR__LANGUAGE": "en"})
    kv = await nc.jetstream().create_key_value(bucket="xz_agents")
    await save_agent(kv, "zh-device", AgentConfig(language="zh"))
    packets = encode_pcm(read_wav(fixture_wav("zh_what_time.wav")), 16000, 60)
    texts = {}
    for device_id in ("zh-device", "en-device"):
        session = f"s-asr-{device_id}"
        sub = await nc.subscribe(S.llm(session))
        await nc.publish(S.asr(session), Utterance(session_id=session, turn_id=new_turn_id(), device_id=device_id).pack(packets))
        texts[device_id] = UserTurn.decode((await sub.next_msg(timeout=60)).data).text
    cjk = re.compile(r"[\u4e00-\u9fff]")
    assert cjk.search(texts["zh-device"]) and "几点" in texts["zh-device"], texts
    assert not cjk.search(texts["en-device"]), texts


async def test_asr_keeps_the_utterance_for_the_history_when_asked(nats_only, nc):
    """asr.keep_audio: the utterance goes to the xz_audio object store as Ogg Opus (the device's
    own packets) and the turn names it; a device-less utterance is not kept."""
    start(nats_only, "asr", {"XZ_ASR__KEEP_AUDIO": "true"})
    speech = read_wav(fixture_wav("en_what_time.wav"))
    packets = encode_pcm(speech, 16000, 60)
    session = "s-asr-keep"
    sub = await nc.subscribe(S.llm(session))
    turn_id = new_turn_id()
    await nc.publish(S.asr(session), Utterance(session_id=session, turn_id=turn_id, device_id="d-keep").pack(packets))
    turn = UserTurn.decode((await sub.next_msg(timeout=30)).data)
    assert turn.audio == f"{turn_id}.ogg"
    store = await nc.jetstream().object_store("xz_audio")
    data = (await store.get(turn.audio)).data
    assert data.startswith(b"OggS") and b"OpusHead" in data[:100]
    for packet in packets[:5]:
        assert packet in data  # the device's own packets, not a re-encoding
    info = await nc.jetstream().stream_info("OBJ_xz_audio")
    assert info.config.max_age == 30 * 86400  # kept for asr.keep_audio_days
    # Without a device (no owner to show it to) nothing is kept.
    await nc.publish(S.asr(session), Utterance(session_id=session, turn_id=new_turn_id()).pack(packets))
    assert UserTurn.decode((await sub.next_msg(timeout=30)).data).audio is None
