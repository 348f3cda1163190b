"""Bad input against a live gateway: what a broken or hostile client can throw at it.

Each kind of attack is a coroutine that does its worst a number of times and counts what it
tried. The gateway must answer every one with a clear error or a counted drop, keep serving
normal devices meanwhile, and come back to its baseline memory and task count afterwards
(``tests/e2e/test_attack.py`` checks that; ``bench/attack.py`` runs it by hand).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections import Counter
from typing import Awaitable, Callable

import aiohttp
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from xiaozhi.sim import random_mac

Attack = Callable[["Attacker"], Awaitable[None]]


class Attacker:
    def __init__(
        self,
        ws_url: str,
        http_url: str,
        rounds: int = 20,
        seed: int = 7,
        slowloris_s: float = 12.0,
        vision_auth: tuple[str, str] | None = None,
        source_ip: str | None = None,
        victim: dict[str, str] | None = None,
    ) -> None:
        self.ws_url = ws_url
        # The attacker's own source address (e.g. 127.0.0.2 on loopback) for the flood attacks,
        # so that limits per address hit the attacker and not the devices beside it.
        self.source_ip = source_ip
        # The device the handshake-limit attack tries to keep offline: device_id, client_id,
        # token ("" or absent: none); a random unbound device when not given.
        self.victim = victim
        # How long slowloris connections dribble (longer than the server's header deadline).
        self.slowloris_s = slowloris_s
        # (device id, valid vision token): lets the image checks be reached past the token check.
        self.vision_auth = vision_auth
        self.http_url = http_url.rstrip("/")
        self.rounds = rounds
        self.tried: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.rng = random.Random(seed)
        host_port = ws_url.split("://", 1)[1].split("/", 1)[0]
        self.host, port = host_port.rsplit(":", 1)
        self.ws_port = int(port)
        http_host_port = self.http_url.split("://", 1)[1].split("/", 1)[0]
        self.http_port = int(http_host_port.rsplit(":", 1)[1])

    # ------------------------------------------------------------------ helpers

    def headers(self, version: int = 1) -> dict[str, str]:
        return {"Device-Id": random_mac(), "Client-Id": str(uuid.uuid4()), "Protocol-Version": str(version)}

    async def socket(self, version: int = 1, headers: dict[str, str] | None = None):
        return await websockets.connect(self.ws_url, additional_headers=headers or self.headers(version), max_size=None, open_timeout=10, ping_interval=None, close_timeout=1)

    async def hello(self, ws, version: int = 1) -> None:
        await ws.send(json.dumps({"type": "hello", "version": version, "transport": "websocket", "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}}))
        await asyncio.wait_for(ws.recv(), 5)

    def note(self, kind: str, outcome: str) -> None:
        self.tried[kind] += 1
        self.outcomes[f"{kind}: {outcome}"] += 1

    async def drain(self, ws, seconds: float = 0.3) -> str:
        """Read until closed or quiet; returns how it ended."""
        try:
            while True:
                await asyncio.wait_for(ws.recv(), seconds)
        except asyncio.TimeoutError:
            return "still open"
        except ConnectionClosed as exc:
            return f"closed {exc.rcvd.code if exc.rcvd else 'abruptly'}"

    # ------------------------------------------------------------------ WebSocket attacks

    async def malformed_json(self) -> None:
        samples = ["{", "not json", "[1, 2", '{"type": ', "\x00\x01\x02", "{" * 500, '{"type": "hello", "audio_params": {"sample_rate": "NaN"}}x', "null", "[]", "42", '"text"']
        ws = await self.socket()
        await self.hello(ws)
        for i in range(self.rounds):
            await ws.send(samples[i % len(samples)])
            self.tried["malformed JSON"] += 1
        self.outcomes[f"malformed JSON: {await self.drain(ws)}"] += 1
        await ws.close()

    async def unknown_types(self) -> None:
        ws = await self.socket()
        await self.hello(ws)
        for _ in range(self.rounds):
            message = {"type": self.rng.choice(["xyz", "", "HELLO", "listen ", "tts", "stt", "iot", "mcp", "goodbye"]), "state": self.rng.choice(["start", "banana", None, 5]), "payload": self.rng.choice([None, [], {"id": "x"}, "str", 12])}
            await ws.send(json.dumps(message))
            self.tried["unknown or wrongly typed messages"] += 1
        self.outcomes[f"unknown or wrongly typed messages: {await self.drain(ws)}"] += 1
        await ws.close()

    async def binary_before_hello(self) -> None:
        for _ in range(max(1, self.rounds // 4)):
            ws = await self.socket()
            for _ in range(4):
                await ws.send(os.urandom(self.rng.randint(1, 200)))
                self.tried["binary frames before hello"] += 1
            self.outcomes[f"binary frames before hello: {await self.drain(ws)}"] += 1
            await ws.close()

    async def oversized_frames(self) -> None:
        for size, kind in ((70_000, "binary"), (200_000, "binary"), (70_000, "text")):
            ws = await self.socket()
            await self.hello(ws)
            try:
                await ws.send(os.urandom(size) if kind == "binary" else "x" * size)
                outcome = await self.drain(ws, 2)
            except ConnectionClosed as exc:
                outcome = f"closed {exc.rcvd.code if exc.rcvd else 'abruptly'}"
            self.note("frames over 64 KB", outcome)
            await ws.close()

    async def garbage_opus(self) -> None:
        ws = await self.socket()
        await self.hello(ws)
        await ws.send(json.dumps({"type": "listen", "state": "start", "mode": "auto"}))
        for _ in range(self.rounds * 5):
            await ws.send(os.urandom(self.rng.randint(1, 400)))
            self.tried["garbage Opus"] += 1
            await asyncio.sleep(0.005)
        self.outcomes[f"garbage Opus: {await self.drain(ws)}"] += 1
        await ws.close()

    async def wrong_versions(self) -> None:
        for version in ("0", "4", "7", "-1", "abc", "1.5", "99999999999999999999"):
            try:
                ws = await self.socket(headers={**self.headers(), "Protocol-Version": version})
                self.note("wrong protocol versions", f"accepted {version}")
                await ws.close()
            except InvalidStatus as exc:
                self.note("wrong protocol versions", f"HTTP {exc.response.status_code}")
        # A v2/v3 session whose binary frames have broken headers.
        for version in (2, 3):
            ws = await self.socket(version)
            await self.hello(ws, version)
            for _ in range(self.rounds):
                await ws.send(os.urandom(self.rng.randint(0, 20)))
                self.tried["wrong protocol versions"] += 1
            self.outcomes[f"wrong protocol versions: v{version} bad headers {await self.drain(ws)}"] += 1
            await ws.close()

    async def floods(self) -> None:
        ws = await self.socket()
        await self.hello(ws)
        for i in range(self.rounds * 50):
            await ws.send(json.dumps({"type": "listen", "state": "start" if i % 2 else "stop", "mode": "auto"}))
            self.tried["message floods"] += 1
        for _ in range(self.rounds * 50):
            await ws.send(b"\xf8\xff\xfe")  # a valid Opus silence packet, far faster than real time
            self.tried["message floods"] += 1
        self.outcomes[f"message floods: {await self.drain(ws, 1)}"] += 1
        await ws.close()

    async def half_open(self) -> None:
        """Connections that never finish: TCP only, a partial upgrade request, a socket that
        said hello and then went silent without closing."""
        writers = []
        for i in range(self.rounds):
            reader, writer = await asyncio.open_connection(self.host, self.ws_port)
            if i % 2:
                writer.write(b"GET /xiaozhi/v1/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                await writer.drain()
            writers.append((reader, writer))
            self.tried["half-open connections"] += 1
        silent = []
        for _ in range(max(1, self.rounds // 4)):
            ws = await self.socket()
            await self.hello(ws)
            silent.append(ws)
            self.tried["half-open connections"] += 1
        await asyncio.sleep(1)
        for _reader, writer in writers:
            writer.transport.abort()
        for ws in silent:
            ws.transport.abort()  # vanish without a close frame, as a device losing power
        self.outcomes["half-open connections: dropped by the client"] += 1

    # ------------------------------------------------------------------ HTTP attacks

    async def slowloris(self) -> None:
        """Many HTTP connections that send their headers a byte at a time."""
        writers = []
        for _ in range(self.rounds):
            _reader, writer = await asyncio.open_connection(self.host, self.http_port)
            writer.write(b"POST /xiaozhi/ota/ HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            writers.append(writer)
            self.tried["slowloris on the HTTP port"] += 1
        for _ in range(int(self.slowloris_s)):
            await asyncio.sleep(1)
            for writer in writers:
                try:
                    writer.write(b"X")
                    await writer.drain()
                except (ConnectionError, OSError):
                    pass
        closed = sum(1 for w in writers if w.transport.is_closing())
        self.outcomes[f"slowloris on the HTTP port: {closed} of {len(writers)} cut off by the server"] += 1
        for writer in writers:
            writer.transport.abort()

    async def bad_ota(self) -> None:
        url = f"{self.http_url}/xiaozhi/ota/"
        cases = [
            ({}, b"{}"),
            ({"Device-Id": "not-a-mac"}, b"{}"),
            ({"Device-Id": random_mac()}, b"{"),
            ({"Device-Id": random_mac()}, b"[]"),
            ({"Device-Id": random_mac()}, b'{"application": 5, "board": [], "mac_address": {}}'),
            ({"Device-Id": random_mac(), "Content-Type": "text/plain"}, os.urandom(300)),
            ({"Device-Id": random_mac()}, b"{" + b'"x":' * 1000 + b"1}"),
            ({"Device-Id": random_mac(), "Activation-Version": "banana"}, b"{}"),
            ({"Device-Id": "\x7f" * 3}, b"{}"),
        ]
        async with aiohttp.ClientSession() as http:
            for headers, body in cases:
                try:
                    async with http.post(url, data=body, headers=headers) as response:
                        self.note("OTA malformed headers and bodies", f"HTTP {response.status}")
                except (aiohttp.ClientError, ValueError) as exc:
                    self.note("OTA malformed headers and bodies", f"client refused: {type(exc).__name__}")
            async with http.post(url + "activate", data=b"\xff\xfe", headers={"Device-Id": random_mac()}) as response:
                self.note("OTA malformed headers and bodies", f"HTTP {response.status}")
            big = b"{" + b" " * (12 * 1024 * 1024) + b"}"
            try:
                async with http.post(url, data=big, headers={"Device-Id": random_mac()}) as response:
                    self.note("OTA malformed headers and bodies", f"oversized body: HTTP {response.status}")
            except aiohttp.ClientError as exc:
                self.note("OTA malformed headers and bodies", f"oversized body: {type(exc).__name__}")

    async def bad_vision(self) -> None:
        url = f"{self.http_url}/mcp/vision/explain"
        async with aiohttp.ClientSession() as http:
            cases: list[tuple[dict[str, str], object]] = [
                ({}, b"x"),
                ({"Authorization": "Bearer nonsense", "Device-Id": random_mac()}, b"x"),
                ({"Authorization": "Bearer a.b.c", "Device-Id": random_mac(), "Content-Type": "multipart/form-data; boundary=zz"}, b"--zz\r\nbroken"),
            ]
            for headers, body in cases:
                async with http.post(url, data=body, headers=headers) as response:
                    self.note("vision malformed, oversized and wrong-type images", f"HTTP {response.status}")
            device_id, token = self.vision_auth or (random_mac(), "x")
            valid = {"Authorization": f"Bearer {token}", "Device-Id": device_id}
            form = aiohttp.FormData()
            form.add_field("question", "what is this?")
            form.add_field("file", os.urandom(7 * 1024 * 1024), filename="big.jpg", content_type="image/jpeg")
            try:
                async with http.post(url, data=form, headers=valid) as response:
                    self.note("vision malformed, oversized and wrong-type images", f"oversized: HTTP {response.status} {(await response.text())[:80]}")
            except aiohttp.ClientError as exc:
                self.note("vision malformed, oversized and wrong-type images", f"oversized: {type(exc).__name__}")
            form = aiohttp.FormData()
            form.add_field("question", "what is this?")
            form.add_field("file", b"%PDF-1.4 not an image", filename="doc.pdf", content_type="application/pdf")
            async with http.post(url, data=form, headers=valid) as response:
                self.note("vision malformed, oversized and wrong-type images", f"wrong type: HTTP {response.status} {(await response.text())[:80]}")
            async with http.post(url, data=b"--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc", headers={**valid, "Content-Type": "multipart/form-data; boundary=zz"}) as response:
                self.note("vision malformed, oversized and wrong-type images", f"truncated multipart: HTTP {response.status} {(await response.text())[:80]}")

    # ------------------------------------------------------------------ floods meant to deny service

    def _local(self) -> dict:
        return {"local_addr": (self.source_ip, 0)} if self.source_ip else {}

    async def ota_flood(self, count: int | None = None) -> None:
        """Hundreds of OTA requests at once, each with a new MAC (issue 14, vuln 7): they must be
        refused per address (429) or answered, never hang the gateway or take all its codes."""
        count = count or self.rounds * 10
        url = f"{self.http_url}/xiaozhi/ota/"
        connector = aiohttp.TCPConnector(limit=50, **self._local())
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as http:

            async def one() -> None:
                headers = {"Device-Id": random_mac(), "Client-Id": str(uuid.uuid4()), "Content-Type": "application/json"}
                try:
                    async with http.post(url, data=b"{}", headers=headers) as response:
                        await response.read()
                        self.note("OTA flood", f"HTTP {response.status}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    self.note("OTA flood", f"failed: {type(exc).__name__}")

            await asyncio.gather(*(one() for _ in range(count)))

    async def handshake_limit(self, count: int = 30) -> None:
        """Token-less handshakes with a victim's Device-Id (and Client-Id), then the victim
        connects (issue 14, vuln 10): the victim must not be refused with 429."""
        victim = self.victim or {"device_id": random_mac(), "client_id": str(uuid.uuid4()), "token": ""}
        forged = {"Device-Id": victim["device_id"], "Client-Id": victim["client_id"], "Protocol-Version": "1"}
        for _ in range(count):
            try:
                ws = await websockets.connect(self.ws_url, additional_headers=forged, open_timeout=10, ping_interval=None, close_timeout=1, **self._local())
                self.note("handshake limit", "HTTP 101 without a token")
                await ws.close()
            except InvalidStatus as exc:
                self.note("handshake limit", f"HTTP {exc.response.status_code}")
        headers = dict(forged)
        if victim.get("token"):
            headers["Authorization"] = f"Bearer {victim['token']}"
        try:
            ws = await websockets.connect(self.ws_url, additional_headers=headers, open_timeout=10, ping_interval=None, close_timeout=1)
            await self.hello(ws)
            self.outcomes["handshake limit: the victim connected"] += 1
            await ws.close()
        except InvalidStatus as exc:
            self.outcomes[f"handshake limit: the victim got HTTP {exc.response.status_code}"] += 1

    ATTACKS: tuple[str, ...] = (
        "malformed_json", "unknown_types", "binary_before_hello", "oversized_frames", "garbage_opus",
        "wrong_versions", "floods", "half_open", "slowloris", "bad_ota", "bad_vision",
        # Last: they are meant to trip the limits per address.
        "ota_flood", "handshake_limit",
    )

    async def run(self) -> dict:
        errors: dict[str, str] = {}
        for name in self.ATTACKS:
            try:
                await getattr(self, name)()
            except Exception as exc:  # noqa: BLE001 - an attack that itself fails is reported
                errors[name] = f"{type(exc).__name__}: {exc}"[:200]
        return {"tried": dict(self.tried), "outcomes": dict(self.outcomes), "attack_errors": errors}
