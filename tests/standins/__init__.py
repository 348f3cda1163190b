"""Local stand-ins for outside services nobody can reach here (cloud and self-hosted ASR),
each speaking its vendor's real protocol, byte for byte, as the vendor documents it.

A stand-in transcribes the audio it receives with the packaged Whisper models, so a correct
transcript proves the audio arrived intact and in order. :class:`ThreadedServer` runs one in a
thread of its own (its own event loop), on a port fixed before the pipeline starts, so the
session's ASR worker can be configured with it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Awaitable, Callable

import numpy as np

_ENGINES: dict[str, Any] = {}
_LOCK = threading.Lock()
# Seconds the stand-ins spent in Whisper (the vendor's own work), for bench/asr_engines.py.
WHISPER_SECONDS = [0.0]
LAST_WHISPER_S = [0.0]  # how long the latest call took (the final text's, once an answer is out)


def whisper_text(pcm: np.ndarray, language: str | None = None) -> str:
    """What the packaged Whisper hears in 16 kHz int16 PCM: tiny.en for English (or no
    language), base for any other language."""
    from asr_svc.engine import WhisperEngine
    from shared.audio import int16_to_float

    model = "tiny.en" if language in (None, "en") else "base"
    with _LOCK:
        engine = _ENGINES.get(model)
        if engine is None:
            engine = _ENGINES[model] = WhisperEngine(model, language or "en", beam_size=1 if model == "tiny.en" else 5, threads=1)
        started = time.perf_counter()
        try:
            return engine.transcribe(int16_to_float(pcm), language).text.strip()
        finally:
            WHISPER_SECONDS[0] += time.perf_counter() - started
            LAST_WHISPER_S[0] = time.perf_counter() - started


class ThreadedServer:
    """An aiohttp application served on 127.0.0.1:``port`` from a background thread."""

    def __init__(self, make_app: Callable[[], Awaitable[Any]] | Callable[[], Any], port: int) -> None:
        self.make_app = make_app
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"standin-{port}", daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self.loop)

        async def up() -> None:
            app = self.make_app()
            if asyncio.iscoroutine(app):
                app = await app
            # A stand-in holding a request open on purpose (a slow vendor) must not hold up
            # the test's teardown: connections get a second to finish.
            self._runner = web.AppRunner(app, shutdown_timeout=1.0)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        try:
            self.loop.run_until_complete(up())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self) -> "ThreadedServer":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"stand-in on port {self.port} did not start") from self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():

            async def halt() -> None:
                for task in asyncio.all_tasks(self.loop):
                    if task is not asyncio.current_task():
                        task.cancel()  # handlers still waiting (slow, never-answering vendors)
                self.loop.stop()

            asyncio.run_coroutine_threadsafe(halt(), self.loop)
            self._thread.join(10)

    def __enter__(self) -> "ThreadedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
