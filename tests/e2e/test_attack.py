"""The live gateway under attack (xiaozhi/attack.py): malformed JSON, unknown types, binary
before hello, frames over 64 KB, garbage Opus, wrong protocol versions, floods, half-open
connections, slowloris, malformed OTA and vision requests, an OTA flood and token-less
handshakes with a victim's id (tests/security/test_gateway_attacks.py runs those two against
the limits they are meant to trip). A normal device keeps talking
meanwhile, and afterwards the gateway's memory and task count are back to where they were.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from tests.conftest import start_gateway
from xiaozhi import prom
from gateway.auth import issue_vision_token
from xiaozhi.attack import Attacker
from xiaozhi.procstat import rss_mb
from xiaozhi.sim import SimDevice, random_mac

pytestmark = pytest.mark.e2e

KEY = "attack-test-key"


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
        return json.loads(response.read())


async def test_gateway_survives_bad_input_and_comes_back_to_baseline(pipeline):
    # Rate limits would (rightly) refuse this many connections from one address; they have a
    # test of their own. Here every bad input must reach the handlers.
    gateway = start_gateway(
        pipeline.stack,
        rate_limits__connections_per_minute_per_ip="0",
        rate_limits__connections_per_minute_per_device="0",
        http_header_timeout_s="2",
        auth__key=KEY,
    )
    port = gateway.proc.metrics_port  # type: ignore[attr-defined]
    pid = gateway.proc.popen.pid  # type: ignore[attr-defined]
    try:
        async with SimDevice(ws_url=gateway.ws_url) as warm:
            assert (await warm.type_text("What time is it?")).frames > 0
        await asyncio.sleep(1.5)
        base = health(port)
        base_rss = rss_mb(pid)
        before = prom.scrape(port)

        # A valid vision token, so the image checks are reached (not only the token check).
        device = random_mac()
        token = issue_vision_token(KEY, device, int(time.time()), 600)
        attacker = Attacker(gateway.ws_url, gateway.http_url, rounds=20, slowloris_s=4, vision_auth=(device, token), source_ip="127.0.0.2")

        async def normal_device() -> list:
            reports = []
            async with SimDevice(ws_url=gateway.ws_url) as device:
                for _ in range(2):
                    reports.append(await device.type_text("What time is it?", reply_timeout=60))
            return reports

        result, reports = await asyncio.gather(attacker.run(), normal_device())
        print(json.dumps(result, indent=1))
        assert not result["attack_errors"], result["attack_errors"]
        for kind in ("malformed JSON", "unknown or wrongly typed messages", "binary frames before hello", "frames over 64 KB",
                     "garbage Opus", "wrong protocol versions", "message floods", "half-open connections",
                     "slowloris on the HTTP port", "OTA malformed headers and bodies", "vision malformed, oversized and wrong-type images",
                     "OTA flood", "handshake limit"):
            assert result["tried"].get(kind, 0) >= 1, kind
        # The normal device was served throughout.
        for report in reports:
            assert report.error is None and report.frames > 0, report
        # Protocol version and oversized frames are refused, never accepted.
        assert not any("accepted" in k for k in result["outcomes"]), result["outcomes"]
        assert any(k.startswith("frames over 64 KB: closed 1009") for k in result["outcomes"]), result["outcomes"]
        # Slowloris connections are cut off at the header deadline.
        assert "slowloris on the HTTP port: 20 of 20 cut off by the server" in result["outcomes"], result["outcomes"]
        # Images too big or of the wrong type are refused with a reason, not passed on.
        vision = [k.split(": ", 1)[1] for k in result["outcomes"] if k.startswith("vision")]
        checked = [v for v in vision if v.startswith(("oversized", "wrong type", "truncated"))]
        assert len(checked) == 3 and all('"success": false' in v for v in checked), vision

        # The OTA flood met the limit per address (the connection limits are off here, the OTA
        # one is not); the handshakes did not keep the victim out.
        assert result["outcomes"].get("OTA flood: HTTP 429", 0) >= 100, result["outcomes"]
        assert result["outcomes"].get("handshake limit: the victim connected") == 1, result["outcomes"]
        # Bad input was counted, and the process is still up.
        window = prom.delta(prom.scrape(port), before)
        dropped = {dict(labels)["reason"]: v for (name, labels), v in window.items() if name == "xz_dropped_total" and v > 0}
        assert dropped.get("audio_before_hello", 0) >= 1, dropped
        assert gateway.proc.popen.poll() is None  # type: ignore[attr-defined]

        # Back to baseline: no session, no task left behind, memory back within a margin.
        deadline = time.monotonic() + 30
        while True:
            now = health(port)
            if now["sessions"] == 0 and now["tasks"] <= base["tasks"] + 2:
                break
            assert time.monotonic() < deadline, (base, now)
            await asyncio.sleep(0.5)
        grown = rss_mb(pid) - base_rss
        print(f"gateway RSS {base_rss:.1f} MB -> {rss_mb(pid):.1f} MB; tasks {base['tasks']} -> {now['tasks']}; dropped {dropped}")
        assert grown < 40, grown
        async with SimDevice(ws_url=gateway.ws_url) as device:
            assert (await device.type_text("What time is it?")).frames > 0
    finally:
        gateway.stop()
