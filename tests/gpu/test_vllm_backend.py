"""vLLM in the LLM worker's process, on a GPU node: run with ``pytest tests/gpu`` there.

Skipped where vLLM or a CUDA GPU is missing (CI and laptops). The model is the packaged SmolLM2
converted for vLLM (``packaged_hf_model``), or ``XZ_TEST_VLLM_MODEL`` (a model id or path).
docs/llm.md says where and when this last ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time

import pytest
import pytest_asyncio

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (GPU nodes: pip install 'xiaozhi-nats[vllm]')")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("vLLM needs a CUDA GPU", allow_module_level=True)

from llm_svc.backends import ANSWERED_BY, ToolCallRequest  # noqa: E402
from llm_svc.vllm_backend import VllmBackend, packaged_hf_model  # noqa: E402
from shared.messages import ToolSpec, UserTurn, new_turn_id  # noqa: E402
from tests.conftest import collect_llm_turn  # noqa: E402
from xiaozhi.stack import free_port  # noqa: E402

SYSTEM = {"role": "system", "content": "You are Xiaozhi, a friendly voice assistant. Answer in one to three short spoken sentences."}
GET_TIME = ToolSpec(name="get_time", description="Get the current time, date and weekday.")
SET_VOLUME = ToolSpec(
    name="self_audio_speaker_set_volume",
    description="Set the speaker volume of the device (0 to 100).",
    parameters={"type": "object", "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["volume"]},
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return os.environ.get("XZ_TEST_VLLM_MODEL") or packaged_hf_model(tmp_path_factory.mktemp("models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(model_dir):
    engine = VllmBackend(model_dir, max_tokens=64, temperature=0.0, gpu_memory_utilization=0.3, max_model_len=2048, timeout_s=60)
    yield engine
    await engine.close()


async def collect(backend, messages, tools=(), cancel=None):
    out = []
    async for delta in backend.stream(messages, list(tools), cancel or threading.Event()):
        out.append(delta)
    return out


@pytest.mark.asyncio(loop_scope="module")
async def test_streams_an_answer_token_by_token(backend, model_dir):
    deltas = await collect(backend, [SYSTEM, {"role": "user", "content": "Say hello to my friend Anna."}])
    assert len(deltas) >= 2 and all(isinstance(d, str) for d in deltas), deltas
    text = "".join(deltas)
    assert re.search(r"[A-Za-z]{2,}", text), text
    assert ANSWERED_BY.get() == model_dir


@pytest.mark.asyncio(loop_scope="module")
async def test_constrained_tool_choice_calls_get_time(backend):
    deltas = await collect(backend, [SYSTEM, {"role": "user", "content": "What time is it?"}], [GET_TIME])
    assert len(deltas) == 1 and isinstance(deltas[0], ToolCallRequest), deltas
    assert deltas[0].name == "get_time" and json.loads(deltas[0].arguments) == {}


@pytest.mark.asyncio(loop_scope="module")
async def test_constrained_arguments_follow_the_schema(backend):
    call = await backend.classify([SYSTEM, {"role": "user", "content": "Set the volume to 80."}], [SET_VOLUME])
    assert call is not None and call.name == SET_VOLUME.name, call
    arguments = json.loads(call.arguments)
    assert isinstance(arguments.get("volume"), int) and 0 <= arguments["volume"] <= 100, arguments


@pytest.mark.asyncio(loop_scope="module")
async def test_cancel_aborts_the_request(backend):
    cancel = threading.Event()
    seen = []
    long = [SYSTEM, {"role": "user", "content": "Tell me a very long story about a dragon."}]
    async for delta in backend.stream(long, [], cancel):
        seen.append(delta)
        cancel.set()  # the device said abort after the first words
    assert len(seen) == 1
    for _ in range(50):
        if not backend.engine.output_processor.has_unfinished_requests():
            break
        await asyncio.sleep(0.05)
    assert not backend.engine.output_processor.has_unfinished_requests()


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_turns_are_batched(backend):
    prompts = [[SYSTEM, {"role": "user", "content": f"Give me one fact about the number {n}."}] for n in range(16)]
    started = time.monotonic()
    answers = await asyncio.gather(*(collect(backend, p) for p in prompts))
    elapsed = time.monotonic() - started
    assert all(a and "".join(a).strip() for a in answers)
    print(f"16 concurrent answers in {elapsed:.2f} s")


async def test_llm_worker_answers_a_turn_with_vllm(nats_only, nc, model_dir):
    """The LLM worker process with llm.backend=vllm answers turns over NATS."""
    env = {"XZ_LLM__BACKEND": "vllm", "XZ_LLM__MODEL": model_dir, "XZ_LLM__EMOJI_PROMPT": "false", "XZ_LLM__VLLM_GPU_MEMORY_UTILIZATION": "0.3", "XZ_LLM__TOOLS": "false"}
    llm = nats_only.start_service("llm", free_port(), env)
    nats_only.wait_healthy([llm], timeout=400)
    session = "s-vllm"
    events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="Say hello to my friend Anna."), timeout=120)
    assert events[-1].kind == "turn_end" and jobs and all(j.text.strip() for j in jobs)
    assert jobs[0].text != "Sorry, I could not think of an answer just now."
    events, jobs = await collect_llm_turn(nc, session, UserTurn(session_id=session, turn_id=new_turn_id(), text="Thanks! And what is your name?"), timeout=120)
    assert events[-1].kind == "turn_end" and jobs and jobs[0].text != "Sorry, I could not think of an answer just now."
    assert "vLLM engine ready" in (nats_only.log_dir / "llm.log").read_text()
