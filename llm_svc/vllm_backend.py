"""vLLM in this process, for GPU nodes (optional extra: ``pip install 'xiaozhi-nats[vllm]'``).

The usual production setup runs ``vllm serve`` and points the OpenAI-compatible backend at it;
this backend is for a GPU node that runs the LLM worker itself: one engine, continuous batching
of all the turns the worker holds (``work.llm.concurrency``, 16 by default), prefix caching of
the shared system prompt. The model's own chat template formats the prompt.

Tools, by ``llm.vllm_tool_calls``:

- ``constrained`` (default): structured output (vLLM's guided decoding) makes the model choose
  between "message:" and "functions.<name>:", then write the chosen tool's arguments against its
  JSON schema; works with any model, the tiny default included, as the llama.cpp backend does.
- ``hermes``: the chat template is given the tools and the model writes
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen 2.5/3, Hermes and most
  tool-tuned open models). Text is held back while it may still be the start of a call.

Verified on an H100 (see docs/llm.md) with tests/gpu/test_vllm_backend.py.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from llm_svc.backends import ANSWERED_BY, BackendError, Delta, ToolCallRequest, bounded_strings, choice_messages, choice_options, chosen_tool, packaged_gguf, plain_messages
from shared.messages import ToolSpec

log = logging.getLogger("llm_svc.vllm")

_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_OPEN = "<tool_call>"


def parse_tool_calls(text: str) -> list[ToolCallRequest]:
    """Hermes-style tool calls in a completion."""
    calls = []
    for block in _TOOL_CALL.findall(text):
        try:
            data = json.loads(block)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            arguments = data.get("arguments", {})
            calls.append(ToolCallRequest(name=data["name"], arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls


def packaged_hf_model(cache_dir: str | os.PathLike | None = None) -> str:
    """The packaged SmolLM2 as a Hugging Face model directory, for ``llm.model: default``.

    vLLM wants safetensors; the package ships a GGUF. Transformers dequantizes it to bf16 once
    (~270 MB, a few seconds) into ``cache_dir`` (default ``$XDG_CACHE_HOME/xiaozhi-nats``), so
    a GPU node runs with no download at all.
    """
    gguf = Path(packaged_gguf())
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xiaozhi-nats"
    target = root / (gguf.stem.replace(".", "-") + "-hf")
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    building = root / f".{target.name}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # Dequantized on load; drop the GGUF marker so it saves as plain bf16 safetensors.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tokenizer.save_pretrained(building)
    model.save_pretrained(building)
    try:
        building.rename(target)  # atomic: a concurrent worker's copy wins, ours is dropped
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
    log.info("packaged model converted for vLLM", extra={"fields": {"path": str(target)}})
    return str(target)


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        model: str,
        max_tokens: int = 120,
        temperature: float = 0.3,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 4096,
        tool_calls: str = "constrained",
        timeout_s: float = 60.0,
    ) -> None:
        # The engine core runs in a child process. The worker builds its backend in a thread, and
        # forking a threaded process can deadlock the child (seen on an H100: the engine never
        # came up), so start it clean.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
        except ImportError as exc:
            raise RuntimeError("the vllm backend needs vLLM on a GPU node: pip install 'xiaozhi-nats[vllm]'") from exc
        from vllm.sampling_params import StructuredOutputsParams
        self._sampling = SamplingParams
        self._structured = StructuredOutputsParams
        if model in ("", "default"):
            model = packaged_hf_model()
        self.model = model
        self.engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(model=model, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, enable_prefix_caching=True)
        )
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.tool_calls = tool_calls
        self.timeout_s = timeout_s
        self._tokenizer: Any = None
        log.info("vLLM engine ready", extra={"fields": {"model": model, "tool_calls": tool_calls, "max_model_len": max_model_len}})

    async def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def _tokenizer_once(self) -> Any:
        if self._tokenizer is None:
            tokenizer = self.engine.get_tokenizer()  # async before vLLM 0.11, plain since
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        return self._tokenizer

    async def _prompt(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> str:
        tokenizer = await self._tokenizer_once()
        if tools:
            try:
                return tokenizer.apply_chat_template(messages, tools=[t.openai() for t in tools], add_generation_prompt=True, tokenize=False)
            except Exception:  # noqa: BLE001 - a template without tool roles: plain text instead
                pass
        return tokenizer.apply_chat_template(plain_messages(messages), add_generation_prompt=True, tokenize=False)

    async def _generate(self, prompt: str, params: Any, cancel: threading.Event) -> AsyncIterator[str]:
        """The completion so far, each time it grows; gives up after ``timeout_s`` of silence."""
        request_id = uuid.uuid4().hex
        outputs = self.engine.generate(prompt, params, request_id).__aiter__()
        finished = False
        try:
            while True:
                try:
                    output = await asyncio.wait_for(outputs.__anext__(), self.timeout_s)
                except StopAsyncIteration:
                    finished = True
                    return
                except asyncio.TimeoutError:
                    raise BackendError(f"vLLM produced nothing for {self.timeout_s:.0f} s") from None
                if cancel.is_set():
                    return
                yield output.outputs[0].text
                if output.finished:
                    finished = True
                    return
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - engine errors reach the turn as a spoken error
            raise BackendError(f"vLLM failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if not finished:
                await self.engine.abort(request_id)
            await outputs.aclose()

    async def stream(self, messages: list[dict[str, Any]], tools: list[ToolSpec], cancel: threading.Event) -> AsyncIterator[Delta]:
        ANSWERED_BY.set(self.model)
        if tools and self.tool_calls == "constrained":
            call = await self.classify(messages, tools)
            if call is not None:
                yield call
                return
            tools = []
        prompt = await self._prompt(messages, tools)
        params = self._sampling(max_tokens=self.max_tokens, temperature=self.temperature, repetition_penalty=1.1)
        sent = 0
        text = ""
        holding = bool(tools)  # hold output while it may still be the start of a tool call
        async for text in self._generate(prompt, params, cancel):
            if holding:
                stripped = text.lstrip()
                if stripped.startswith(_OPEN) or _OPEN.startswith(stripped):
                    continue
                holding = False
            if _OPEN not in text[sent:] and len(text) > sent:
                yield text[sent:]
                sent = len(text)
        if cancel.is_set():
            return
        calls = parse_tool_calls(text) if tools else []
        if calls:
            for call in calls:
                yield call
        elif sent < len(text):
            yield text[sent:]

    async def classify(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> ToolCallRequest | None:
        """Structured-output choice between answering and one tool, then the tool's arguments."""
        tokenizer = await self._tokenizer_once()
        system, rest = choice_messages(messages, tools)
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": system}, *rest], add_generation_prompt=True, tokenize=False)
        never = threading.Event()
        choice = ""
        params = self._sampling(max_tokens=16, temperature=0, structured_outputs=self._structured(choice=choice_options(tools)))
        async for choice in self._generate(prompt, params, never):
            pass
        tool = chosen_tool(choice, tools)
        if tool is None:
            return None
        if not tool.parameters.get("properties"):
            return ToolCallRequest(name=tool.name, arguments="{}")
        arguments = "{}"
        params = self._sampling(max_tokens=128, temperature=0, structured_outputs=self._structured(json=bounded_strings(tool.parameters)))
        async for arguments in self._generate(prompt + choice.strip() + "\n", params, never):
            pass
        return ToolCallRequest(name=tool.name, arguments=arguments)
