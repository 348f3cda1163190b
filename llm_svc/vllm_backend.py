"""vLLM in this process, for GPU nodes (optional extra: ``pip install 'xiaozhi-nats[vllm]'``).

The normal production setup runs ``vllm serve`` and points the OpenAI-compatible backend at it;
this backend is for a GPU node that runs the LLM worker itself. The model's own chat template
formats the prompt (with the tools, for templates that take them); tool calls are read in the
Hermes format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``) that Qwen 2.5 and
many other open models emit.

Not verified here: this project's machines have no GPU, and no GPU was lent to the session that
wrote it (see docs/llm.md).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from typing import Any, AsyncIterator

from llm_svc.backends import BackendError, Delta, ToolCallRequest, plain_messages
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


class VllmBackend:
    name = "vllm"

    def __init__(self, model: str, max_tokens: int = 120, temperature: float = 0.3, gpu_memory_utilization: float = 0.85, max_model_len: int = 4096) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
        except ImportError as exc:
            raise RuntimeError("the vllm backend needs vLLM on a GPU node: pip install 'xiaozhi-nats[vllm]'") from exc
        self._sampling = SamplingParams
        self.engine = AsyncLLMEngine.from_engine_args(
            AsyncEngineArgs(model=model, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        )
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._tokenizer: Any = None
        log.info("vLLM engine ready", extra={"fields": {"model": model}})

    async def close(self) -> None:
        return None

    async def _prompt(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> str:
        if self._tokenizer is None:
            self._tokenizer = await self.engine.get_tokenizer()
        schemas = [t.openai() for t in tools] or None
        try:
            return self._tokenizer.apply_chat_template(messages, tools=schemas, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - a template without tool roles: plain text instead
            return self._tokenizer.apply_chat_template(plain_messages(messages), add_generation_prompt=True, tokenize=False)

    async def stream(self, messages: list[dict[str, Any]], tools: list[ToolSpec], cancel: threading.Event) -> AsyncIterator[Delta]:
        prompt = await self._prompt(messages, tools)
        request_id = uuid.uuid4().hex
        params = self._sampling(max_tokens=self.max_tokens, temperature=self.temperature)
        sent = 0
        text = ""
        holding = bool(tools)  # hold output while it may still be the start of a tool call
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                if cancel.is_set():
                    await self.engine.abort(request_id)
                    return
                text = output.outputs[0].text
                if holding:
                    stripped = text.lstrip()
                    if stripped.startswith(_OPEN) or _OPEN.startswith(stripped):
                        continue
                    holding = False
                if not holding and _OPEN not in text[sent:]:
                    yield text[sent:]
                    sent = len(text)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"vLLM failed: {exc}") from exc
        calls = parse_tool_calls(text)
        if calls:
            for call in calls:
                yield call
        elif sent < len(text):
            yield text[sent:]

    async def classify(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> ToolCallRequest | None:
        async for delta in self.stream(messages, tools, threading.Event()):
            if isinstance(delta, ToolCallRequest):
                return delta
        return None
