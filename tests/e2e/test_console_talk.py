"""The console's Talk page in a real browser: Debian's chromium (Playwright) with a fixture WAV
as its microphone (Chromium's fake audio capture) speaks the device protocol to the gateway,
Opus in and out through WebCodecs; a spoken turn completes, with the transcript and the reply
on the page and the reply's audio decoded and played. Then the turn is in the manager's
history of the browser's device."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.conftest import fixture_wav
from tests.manager.conftest import ADMIN_PASSWORD, Api, start_manager

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def console(pipeline, tmp_path):
    # Where the browser finds the pipeline's gateway: its WebSocket port.
    base, proc = start_manager(pipeline.stack, f"sqlite:///{tmp_path / 'manager.db'}", XZ_GATEWAY__WS_PORT=str(pipeline.ws_port), XZ_GATEWAY__PUBLIC_HOST="127.0.0.1")
    try:
        yield base
    finally:
        proc.popen.terminate()
        proc.popen.wait(15)


def test_a_spoken_turn_from_the_browser(pipeline, console, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian package chromium; `make test` installs it when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed")
    # A second of silence first: the page is listening before the speech starts.
    speech = tmp_path / "speech.wav"
    _pad(fixture_wav("en_what_time.wav"), speech, lead_s=1.5, tail_s=3.0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={speech}%noloop",
            "--autoplay-policy=no-user-gesture-required",
        ])
        context = browser.new_context(permissions=["microphone"], viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and "Failed to load resource" not in msg.text else None)
        try:
            page.goto(console + "/#/talk")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(ADMIN_PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Devices").wait_for()
            page.get_by_role("link", name="Talk").click()
            page.get_by_role("button", name="Start").click()
            page.get_by_text("Listening: say something.").wait_for(timeout=15000)
            # The spoken question, the answer, and its audio.
            page.locator("#talk-transcript li.user").first.wait_for(timeout=30000)
            said = page.locator("#talk-transcript li.user").first.inner_text()
            assert "time" in said.lower(), said
            page.locator("#talk-transcript li.assistant").first.wait_for(timeout=30000)
            # The reply played to its end (the page went back to listening after `tts stop`).
            stats = page.locator("#talk-stats")
            deadline = time.monotonic() + 60
            while int(stats.get_attribute("data-turns") or 0) < 1:
                assert time.monotonic() < deadline, "the reply never finished"
                page.wait_for_timeout(200)
            sent, received, decoded = (int(stats.get_attribute(f"data-{k}")) for k in ("sent", "received", "decoded"))
            assert sent >= 20 and received >= 5 and decoded == received, (sent, received, decoded)
            page.screenshot(path=str(tmp_path / "talk.png"), full_page=True)
            import os

            if os.environ.get("XZ_SCREENSHOTS_DIR"):
                page.screenshot(path=os.path.join(os.environ["XZ_SCREENSHOTS_DIR"], "talk-phone.png"), full_page=True)
                # The same finished turn at desktop size (the layout is responsive).
                page.set_viewport_size({"width": 1280, "height": 860})
                page.screenshot(path=os.path.join(os.environ["XZ_SCREENSHOTS_DIR"], "talk-desktop.png"), full_page=True)
            page.get_by_role("button", name="Stop").click()
        finally:
            context.close()
            browser.close()
    assert not problems, problems
    # The turn is in the manager's history of this browser's device.
    api = Api(console).login("admin", ADMIN_PASSWORD)
    talk_device = api.call("GET", "/api/talk")[1]["device_id"]  # "web-" + 128 random bits, kept
    deadline = time.monotonic() + 10
    while True:
        history = api.call("GET", f"/api/devices/{talk_device}/history")[1]
        if len(history) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [h["role"] for h in history[:2]] == ["assistant", "user"] and "time" in history[1]["text"].lower(), history


def _pad(source, target, lead_s: float, tail_s: float) -> None:
    import wave

    with wave.open(str(source)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    silence = b"\x00" * (params.sampwidth * params.nchannels)
    with wave.open(str(target), "wb") as out:
        out.setparams(params)
        out.writeframes(silence * int(lead_s * params.framerate) + frames + silence * int(tail_s * params.framerate))
