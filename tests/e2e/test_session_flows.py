"""Wake word (alone, with a question in one breath, the device's own), exit command, exit intent, idle endings and voice barge-in, end to end."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from shared.phrases import PHRASES
from tests.conftest import device_with_agent, fixture_wav, log_records, start_gateway
from tts_svc.engine import zh_voice_dir
from xiaozhi.sim import SimDevice, read_wav

pytestmark = pytest.mark.e2e


def tts(state: str):
    return lambda r: r.kind == "json" and r.message.get("type") == "tts" and r.message.get("state") == state


async def wait_closed(device: SimDevice, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if device.closed:
            return True
        await asyncio.sleep(0.05)
    return device.closed


async def test_wake_word_gets_a_cached_greeting_without_llm(pipeline):
    for attempt in range(2):  # the second greeting comes from the TTS worker's clip cache
        async with SimDevice(ws_url=pipeline.ws_url) as device:
            mark = len(device.received)
            await device.detect("你好小智")
            await device.listen_start("auto")
            report = await device.collect_turn(mark, time.monotonic(), timeout=20)
            assert report.stt is None  # a greeting, not a user turn
            assert report.events[0] == "tts.start" and report.events[-1] == "tts.stop"
            assert report.sentences == ["Hi! I'm listening."]
            assert report.frames > 5
            # The clip is ready at once; still, the device needs a moment to enter speaking.
            assert report.start_gap_s is not None and report.start_gap_s >= 0.05
            assert report.lost_frames == 0
    assert "sentence from clip cache" in pipeline.log("tts")


GREETING = "Hi! I'm listening."
FRAME = 960  # 60 ms at 16 kHz: the simulated firmware sends whole frames of its pre-roll


def words(text: str | None) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in (text or "").lower()).split()


def spoken_wake_word() -> np.ndarray:
    """你好小智 (real speech), cut where the wake word engine fires: at the end of the word."""
    pcm = read_wav(fixture_wav("zh_wake.wav"))
    return pcm[: 16 * FRAME]  # speech from 0.12 s to 0.96 s


def sentences_said(device: SimDevice, mark: int) -> list[str]:
    return [r.message.get("text", "") for r in device.received[mark:] if tts("sentence_start")(r)]


async def wake_then(device: SimDevice, word: str, live: np.ndarray) -> int:
    """The firmware's wake word: the pre-roll burst, `detect`, `listen start`, then the live
    microphone (``live``, then silence until the server speaks)."""
    mark = len(device.received)
    await device.wake_word(word, preroll=spoken_wake_word())
    if len(live):
        await device.stream_pcm(live)
    started = lambda: any(tts("start")(r) for r in device.received[mark:])  # noqa: E731
    await device.stream_pcm(np.zeros(0, dtype=np.int16), until=started, max_s=20)
    return mark


async def test_wake_word_and_question_in_one_breath_is_answered(pipeline):
    """你好小智 and "What time is it?" without a pause: the question is answered, no greeting
    talks over it (the pre-roll and the live question are one utterance)."""
    question = read_wav(fixture_wav("en_what_time.wav"))[640:]  # from its first word (0.06 s)
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = await wake_then(device, "你好小智", question)
        report = await device.collect_turn(mark, time.monotonic(), timeout=60)
        assert report.error is None, (report, pipeline.log("vad")[-2000:])
        assert "what time is it" in " ".join(words(report.stt)), report.stt
        assert GREETING not in report.sentences and report.sentences, report.sentences
        assert report.frames > 5
        assert GREETING not in sentences_said(device, mark)
    assert '"verdict": "more"' in pipeline.log("vad")


async def test_wake_word_and_question_in_one_breath_in_mandarin(pipeline):
    """你好小智，现在几点了 without a pause, for an agent that hears Mandarin (the multilingual
    model): the question is transcribed and answered, no greeting."""
    device_id = await device_with_agent(pipeline, language="zh", asr_model="base")
    question = read_wav(fixture_wav("zh_what_time.wav"))[960:]  # from its first syllable (0.08 s)
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        mark = await wake_then(device, "你好小智", question)
        report = await device.collect_turn(mark, time.monotonic(), timeout=90)
        assert report.stopped, report
        # The small base model may mishear one syllable (起点 for 几点): compare characters.
        assert sum(1 for char in "现在几点了" if char in (report.stt or "")) >= 4, report.stt
        assert GREETING not in sentences_said(device, mark), report


async def test_wake_word_said_twice_in_one_breath_gets_the_greeting(pipeline):
    """你好小智，你好小智 without a pause: speech went on after the wake word (the VAD says
    "more", so no greeting yet), but the transcript is the wake word alone. That is no question:
    the greeting, not an LLM answer to the wake word, and not silence."""
    device_id = await device_with_agent(pipeline, language="zh", asr_model="base")
    again = read_wav(fixture_wav("zh_wake.wav"))
    async with SimDevice(ws_url=pipeline.ws_url, device_id=device_id) as device:
        mark = await wake_then(device, "你好小智", again)
        report = await device.collect_turn(mark, time.monotonic(), timeout=90)
        # A Chinese agent greets in Chinese (never the English template), in the Mandarin voice
        # where the deployment has it.
        assert report.stt is None and report.sentences == [PHRASES["zh"]["greeting"]], report
        session = device.session_id
    if (zh_voice_dir() / "fastspeech2.onnx").is_file():
        tts_log = pipeline.log("tts")
        spoken = log_records(tts_log, "sentence", session) + log_records(tts_log, "sentence from clip cache", session)
        assert [r["engine"] for r in spoken] == ["zh"], spoken
    verdicts = [r["verdict"] for r in log_records(pipeline.log("vad"), "wake word verdict", session)]
    assert verdicts == ["more"], verdicts
    # Heard (with punctuation between), then found to be the wake word alone.
    heard = [r["text"] for r in log_records(pipeline.log("asr"), "transcript", session)]
    assert ["".join(words(text)) for text in heard] == ["你好小智你好小智"], heard


async def test_bare_wake_word_with_its_preroll_gets_the_greeting(pipeline):
    """The wake word alone (its pre-roll, then silence): the greeting, no turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = await wake_then(device, "你好小智", np.zeros(0, dtype=np.int16))
        report = await device.collect_turn(mark, time.monotonic(), timeout=20)
        assert report.stt is None and report.sentences == [GREETING], report
        # The session goes on: the next question is answered.
        await device.listen_start("auto")
        answer = await device.speak(read_wav(fixture_wav("en_what_time.wav")))
        assert "time" in words(answer.stt), answer.stt


@pytest.mark.parametrize("word", ["小土豆", "Hi Lexin", "Alexa"])
async def test_the_devices_own_wake_word_gets_the_greeting(pipeline, word):
    """A wake word the server does not list, right after the pre-roll burst: the greeting, not
    an LLM answer to the word itself."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        mark = await wake_then(device, word, np.zeros(0, dtype=np.int16))
        report = await device.collect_turn(mark, time.monotonic(), timeout=20)
        assert report.stt is None and report.sentences == [GREETING], report
        # Nor later: the word never reaches the LLM as a question.
        assert await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "stt", timeout=2, start_index=mark) is None


async def test_unlisted_word_typed_without_preroll_is_a_user_turn(pipeline):
    """The same words as typed text (`detect` with no pre-roll before it): a user turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("Alexa")
        assert report.stt == "Alexa" and GREETING not in report.sentences, report
        assert report.frames > 0


async def test_exit_command_closes_the_session(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.type_text("退出。")
        assert report.stt == "退出。"
        assert report.events[:2] == ["stt", "tts.start"] and report.events[-1] == "tts.stop"
        assert report.frames == 0
        assert await wait_closed(device, 3)


async def test_exit_intent_says_goodbye_then_closes(pipeline):
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        report = await device.speak(read_wav(fixture_wav("en_goodbye.wav")))
        assert "goodbye" in (report.stt or "").lower()
        assert report.events[-1] == "tts.stop" and report.frames > 0
        assert await wait_closed(device, 3), "the session stayed open after the goodbye"


@pytest.fixture
def idle_gateway(pipeline):
    """A second gateway on the same pipeline, with short idle limits."""
    gateway = start_gateway(pipeline.stack, idle_farewell_s="3", hard_close_s="6")
    yield gateway.ws_url
    gateway.stop()


async def test_idle_farewell_then_close(idle_gateway):
    async with SimDevice(ws_url=idle_gateway) as device:
        await device.listen_start("auto")
        device.start_mic()  # silence, as a device left listening
        stop = await device.wait_for(tts("stop"), timeout=30)
        assert stop is not None, "no farewell"
        spoken = [r for r in device.received if r.kind == "json" and r.message.get("state") == "sentence_start"]
        assert spoken and all(not r.message.get("text", "").startswith("Hi!") for r in spoken)
        assert not any(r.kind == "json" and r.message.get("type") == "stt" for r in device.received)
        assert await wait_closed(device, 3)
        await device.stop_mic()


async def test_hard_close_of_a_silent_connection(idle_gateway):
    async with SimDevice(ws_url=idle_gateway) as device:
        started = time.monotonic()
        assert await wait_closed(device, 12)
        assert 5 <= time.monotonic() - started <= 9
        assert not any(tts("start")(r) for r in device.received)


async def test_voice_barge_in_in_realtime_mode(pipeline):
    """Speech over a reply stops it; that utterance, from its first word, is the next turn."""
    async with SimDevice(ws_url=pipeline.ws_url) as device:
        await device.listen_start("realtime")
        device.start_mic()
        mark = len(device.received)
        await device.detect("Tell me a long story about a dragon and a knight.")
        first = await device.wait_for(lambda r: r.kind == "audio", timeout=30, start_index=mark)
        assert first is not None
        # "Tell" is short and comes at once: a VAD reset on the abort would lose it (it did).
        device.mic_say(read_wav(fixture_wav("en_joke.wav")))
        stop = await device.wait_for(tts("stop"), timeout=10, start_index=mark)
        assert stop is not None, "speech over the reply did not stop it"
        # The interruption is answered as a new turn, heard from its first word.
        stt = await device.wait_for(lambda r: r.kind == "json" and r.message.get("type") == "stt", timeout=20, start_index=device.received.index(stop))
        assert stt is not None and words(stt.message["text"])[:2] == ["tell", "me"], stt.message["text"]
        await device.stop_mic()
