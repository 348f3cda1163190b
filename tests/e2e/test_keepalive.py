"""§9.8: the server pings (the device answers pings but never sends its own), read off the wire."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest

from tests.conftest import start_gateway

pytestmark = pytest.mark.e2e


@pytest.fixture
def ping_gateway(nats_only):
    return start_gateway(nats_only, ping_interval_s="1").ws_port


def masked_text(payload: bytes) -> bytes:
    """A client text frame, masked as the firmware's client sends it."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(length)


async def test_server_pings_an_idle_device(ping_gateway):
    reader, writer = await asyncio.open_connection("127.0.0.1", ping_gateway)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (f"GET /xiaozhi/v1/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nDevice-Id: aa:bb:cc:dd:ee:99\r\n"
         f"Client-Id: c\r\nProtocol-Version: 1\r\n\r\n").encode()
    )
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101")  # what the firmware checks, literally
    writer.write(masked_text(json.dumps({"type": "hello", "version": 1, "transport": "websocket"}).encode()))
    opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert opcode == 0x1 and json.loads(payload)["type"] == "hello"
    # Stay idle: the server's ping (opcode 0x9) arrives within about one interval.
    got_ping = False
    for _ in range(5):
        opcode, payload = await asyncio.wait_for(read_frame(reader), 3)
        if opcode == 0x9:
            got_ping = True
            break
    assert got_ping
    writer.close()
