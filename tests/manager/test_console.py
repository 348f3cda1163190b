"""The web console in a real browser (Debian's chromium, driven by Playwright), at phone and
desktop sizes: sign in, make an agent, add a device by the code it speaks, give it the agent,
read its history, upload firmware, make an API token. No console error, no CSP violation.

With ``XZ_SCREENSHOTS_DIR`` set, a screenshot of every page at both sizes goes there
(``docs/console/`` holds the committed ones).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.manager.conftest import ADMIN_PASSWORD, audio_store
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZES = {
    "phone": {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True},
    "desktop": {"viewport": {"width": 1280, "height": 800}},
}


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('console') / 'manager.db'}"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian package chromium; `make test` installs it when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def run_async(coro):
    """A coroutine on its own loop in another thread (Playwright's sync API owns this one's)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=60)


async def _turn_with_recording(nats_url: str, device_id: str, size: str) -> None:
    import json

    from nats.aio.client import Client as NATS

    from shared.audio import encode_pcm
    from shared.ogg import ogg_opus
    from tests.conftest import fixture_wav
    from xiaozhi.sim import read_wav

    nc = NATS()
    await nc.connect(nats_url)
    try:
        store = await audio_store(nc)
        name = f"t-console-{size}.ogg"
        await store.put(name, ogg_opus(encode_pcm(read_wav(fixture_wav("en_what_time.wav")), 16000, 60)))
        event = {"device_id": device_id, "session_id": f"s-{size}", "turn_id": f"t-console-{size}", "user": f"What time is it? ({size})", "assistant": "It is noon.", "audio": name}
        await nc.publish("xz.history", json.dumps(event).encode())
        await nc.flush()
        await asyncio.sleep(0.5)
    finally:
        await nc.close()


def shoot(page, size: str, name: str) -> None:
    """Check what a person would see, then (when asked) keep a screenshot of it."""
    text = page.inner_text("body")
    for junk in ("null", "undefined", "NaN", "[object Object]"):
        assert junk not in text.split(), (name, junk)
    if name == "signin":
        assert not page.locator("#nav").is_visible(), "the navigation shows before sign-in"
    folder = os.environ.get("XZ_SCREENSHOTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}-{size}.png"), full_page=True)


@pytest.mark.parametrize("size", list(SIZES))
def test_console_pages_work_at_phone_and_desktop_size(manager, browser, size):
    context = browser.new_context(**SIZES[size])
    page = context.new_page()
    problems: list[str] = []
    # Script errors, CSP reports and warnings; the browser's own "failed to load" lines for API
    # answers the test provokes (a wrong password's 401) are judged by the responses instead.
    page.on("console", lambda msg: problems.append(f"{msg.type}: {msg.text}") if msg.type in ("error", "warning") and "Failed to load resource" not in msg.text else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 500 or (r.status == 404 and "/api/" not in r.url) else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        # Sign in: a wrong password says so; the right one opens the devices page.
        page.goto(manager.base + "/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill("not-the-password")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("alert").filter(has_text="wrong username or password").wait_for()
        shoot(page, size, "signin")
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Devices").wait_for()

        # An agent.
        agent_name = f"Pirate {size}"
        page.get_by_role("link", name="Agents").click()
        page.get_by_role("link", name="New agent").click()
        page.get_by_label("Name", exact=True).fill(agent_name)
        page.get_by_label("Role prompt").fill("You are {name}, a cheerful pirate.")
        page.get_by_label("Memory").select_option("summary")
        # The LLM backends and speech models this deployment has (GET /api/options).
        page.get_by_label("LLM backend").select_option("qwen")
        page.get_by_label("Speech recognition engine").select_option("base")
        page.get_by_label("Hotwords").fill("小智, Erin")
        page.get_by_label("Corrections").fill("小志 => 小智\nAaron => Erin")
        page.get_by_label("Clock: minutes east of UTC").fill("480")
        shoot(page, size, "agent-edit")
        page.get_by_role("button", name="Create").click()
        page.get_by_text(agent_name).wait_for()
        shoot(page, size, "agents")
        made = {a["name"]: a for a in manager.admin().call("GET", "/api/agents")[1]}[agent_name]
        assert (made["llm_backend"], made["llm_model"], made["asr_model"], made["timezone_offset_minutes"]) == ("qwen", None, "base", 480), made
        assert (made["asr_hotwords"], made["asr_corrections"]) == (["小智", "Erin"], {"小志": "小智", "Aaron": "Erin"}), made

        # A device: it boots, asks OTA and speaks its code; the owner types it in.
        device = SimDevice(ota_url=manager.ota_url)
        code = run_async(device.ota())["activation"]["code"]
        page.get_by_role("link", name="Devices").click()
        page.get_by_label("Code").fill(code)
        page.get_by_label("Name (optional)").fill(f"Kitchen {size}")
        page.get_by_role("button", name="Add device").click()
        card = page.locator(f'[data-device="{device.device_id.lower()}"]')
        card.wait_for()
        assert run_async(device.activate(polls=2, wait_pending_s=0.1))
        # Give it the agent from its card; the API has it.
        card.get_by_label("Agent").select_option(label=agent_name)
        page.get_by_text("Agent changed").wait_for()
        listed = {d["device_id"]: d for d in manager.admin().call("GET", "/api/devices")[1]}
        agents = {a["name"]: a["id"] for a in manager.admin().call("GET", "/api/agents")[1]}
        assert listed[device.device_id.lower()]["agent_id"] == agents[agent_name]
        shoot(page, size, "devices")
        card.get_by_role("link", name="History").click()
        page.get_by_text("Nothing said yet.").wait_for()
        # A turn arrives (as the LLM reports it) with the user's words kept (as the ASR keeps
        # them): the history shows it, and Play plays the recording in the browser.
        run_async(_turn_with_recording(manager.stack.nats_url, device.device_id, size))
        page.reload()
        page.get_by_text(f"What time is it? ({size})").wait_for()
        page.get_by_role("button", name="▶ Play").click()
        played = page.locator("audio")
        played.wait_for(state="attached")
        deadline = time.monotonic() + 10
        while not page.evaluate("(() => { const a = document.querySelector('audio'); return a && a.duration > 0.5 && (a.currentTime > 0 || a.ended); })()"):
            assert time.monotonic() < deadline, "the recording did not play"
            page.wait_for_timeout(100)
        shoot(page, size, "history")

        # Firmware (admin).
        page.get_by_role("link", name="Firmware").click()
        page.get_by_label("Board type").fill(device.board)
        page.get_by_label("Version").fill("7.1.0" if size == "phone" else "7.2.0")
        page.get_by_label("Image (.bin)").set_input_files({"name": "fw.bin", "mimeType": "application/octet-stream", "buffer": b"\x00" * 4096})
        page.get_by_role("button", name="Upload").click()
        page.get_by_role("cell", name="7.1.0" if size == "phone" else "7.2.0").wait_for()
        shoot(page, size, "firmware")

        # Account: an API token, shown once, that works.
        page.get_by_role("link", name="Account").click()
        page.get_by_label("Name", exact=True).fill(f"script {size}")
        page.get_by_role("button", name="Create token").click()
        token = page.locator("code.token").inner_text()
        assert token.startswith("xzm_")
        from tests.manager.conftest import Api

        assert Api(manager.base, token).call("GET", "/api/me")[1]["username"] == "admin"
        shoot(page, size, "account")
        # An admin revokes another user's API token.
        other = f"tokens-{size}"
        assert Api(manager.base, token).call("POST", "/api/users", {"username": other, "password": f"{other}-password"})[0] == 201
        theirs = Api(manager.base).login(other, f"{other}-password")
        their_token = theirs.call("POST", "/api/tokens", {"name": f"their script {size}"})[1]["token"]
        page.reload()
        page.get_by_role("listitem").filter(has_text=f"{other} (user)").get_by_role("button", name="Tokens").click()
        page.get_by_role("list", name=f"tokens of {other}").get_by_role("listitem").filter(has_text=f"their script {size}").get_by_role("button", name="Revoke").click()
        page.get_by_text("Revoked.").wait_for()
        assert Api(manager.base, their_token).call("GET", "/api/me")[0] == 401
        assert theirs.call("GET", "/api/me")[0] == 200  # only that token: the sign-in goes on

        # Nothing wider than the screen on a phone, the navigation included.
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= SIZES[size]["viewport"]["width"], width
        nav = page.evaluate("[document.getElementById('nav').scrollWidth, document.getElementById('nav').clientWidth]")
        assert nav[0] <= nav[1], nav
        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("heading", name="Sign in").wait_for()
    finally:
        context.close()
    assert not problems, problems


def test_the_owner_sends_a_notice_and_reboots_from_the_device_card(manager, browser):
    """Send notice (a small form) and Reboot (confirmed) on a device's card reach the device."""
    import threading

    admin = manager.admin()
    device = SimDevice(ota_url=manager.ota_url)
    code = run_async(device.ota())["activation"]["code"]
    assert admin.call("POST", "/api/devices/bind", {"code": code, "alias": "Hall"})[0] == 201
    assert run_async(device.activate(polls=2, wait_pending_s=0.1))
    connected = threading.Event()

    async def live_device():
        async with SimDevice(ws_url=manager.ws_url, device_id=device.device_id) as live:
            connected.set()
            for _ in range(600):
                if live.closed:
                    break
                await asyncio.sleep(0.05)
            return live.alerts, live.rebooted

    pool = ThreadPoolExecutor(1)
    running = pool.submit(asyncio.run, live_device())
    context = browser.new_context(**SIZES["phone"])
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(f"{msg.type}: {msg.text}") if msg.type in ("error", "warning") and "Failed to load resource" not in msg.text else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        assert connected.wait(15)
        page.goto(manager.base + "/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        card = page.locator(f'[data-device="{device.device_id.lower()}"]')
        card.wait_for()
        card.get_by_text("online", exact=True).wait_for()
        card.get_by_text("Send notice").click()
        card.get_by_label("Message").fill("你好，晚饭好了")
        card.get_by_label("Face").select_option("happy")
        card.get_by_role("button", name="Show on the device").click()
        page.get_by_text("Shown on Hall.").wait_for()
        page.once("dialog", lambda dialog: dialog.accept())
        card.get_by_role("button", name="Reboot").click()
        page.get_by_text("Hall is rebooting.").wait_for()
        alerts, rebooted = running.result(timeout=40)
    finally:
        context.close()
        pool.shutdown(wait=False)
    assert alerts == [{"status": "Notice", "message": "你好，晚饭好了", "emotion": "happy"}] and rebooted
    assert not problems, problems
