"""What the ASR engine tests share: a turn spoken by a fresh device with a given agent, the
records the ASR logged for it, a stand-in served for a test module, and the check that a
failing engine fell back to the built-in Whisper (logged and counted)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from tests.conftest import device_with_agent, fixture_wav, log_records
from tests.standins import ThreadedServer
from tests.standins import engines as standin
from xiaozhi import prom
from xiaozhi.sim import SimDevice, read_wav


@contextlib.contextmanager
def serving(module, port: str) -> Iterator[list[dict]]:
    """Serve ``module.make_app(seen)`` on ``standin.PORTS[port]``; yields what it recorded."""
    seen: list[dict] = []
    with ThreadedServer(lambda: module.make_app(seen), standin.PORTS[port]):
        yield seen


def engine_records(pipeline, session_id: str) -> list[dict]:
    return log_records(pipeline.log("asr"), "transcript", session_id)


async def spoken_turn(pipeline, wav: str, **agent):
    """One spoken turn from a fresh device with this agent. What these tests judge is the
    transcript; the reply is heard starting (its first frames), then the device aborts it, as
    a user pressing the button would, so the suite does not wait out every answer."""
    device_id = await device_with_agent(pipeline, **agent)
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        mark = len(device.received)

        async def abort_when_heard() -> None:
            if await device.wait_for(lambda r: r.kind == "audio", timeout=90, start_index=mark) is not None:
                await device.abort()

        watcher = asyncio.create_task(abort_when_heard())
        try:
            report = await device.speak(read_wav(fixture_wav(wav)), reply_timeout=90)
        finally:
            watcher.cancel()
        return report, device.session_id


async def assert_falls_back(pipeline, engine: str, reason: str) -> None:
    """A turn on ``engine`` is still heard ("What time is it?"), by the built-in Whisper, with
    the engine's failure logged once with ``reason`` and counted as a fallback."""
    before = await asyncio.to_thread(prom.scrape, pipeline.metrics["asr"])
    report, session = await spoken_turn(pipeline, "en_what_time.wav", asr_model=engine)
    assert report.stt == "What time is it?", report
    assert report.frames > 0
    (record,) = engine_records(pipeline, session)
    assert record["engine"] == "tiny.en"  # the fallback answered
    failures = log_records(pipeline.log("asr"), "ASR engine failed", session)
    assert [(r["engine"], r["reason"]) for r in failures] == [(engine, reason)], failures
    window = prom.delta(await asyncio.to_thread(prom.scrape, pipeline.metrics["asr"]), before)
    assert prom.value(window, "xz_asr_fallbacks_total", engine=engine, reason=reason) == 1
    assert prom.value(window, "xz_asr_engine_calls_total", engine=engine, outcome=reason) == 1
