"""The vision endpoint, called as the firmware's camera tool does, against a local OpenAI-shaped model."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import local_http, start_gateway
from xiaozhi.sim import SimDevice

pytestmark = pytest.mark.e2e

BOUNDARY = "----ESP32_CAMERA_BOUNDARY"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 40 + b"\xff\xd9"


def firmware_body(question: str, image: bytes, filename: str = "camera.jpg") -> bytes:
    return (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n{question}\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


async def chunked(data: bytes):
    for i in range(0, len(data), 4096):  # the firmware streams with Transfer-Encoding: chunked
        yield data[i : i + 4096]


@pytest.fixture
async def vision_model():
    """An OpenAI-compatible chat completions endpoint (the shape vLLM/OpenAI vision models serve)."""
    seen: list[dict] = []

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "I see a small test picture."}, "finish_reason": "stop"}]})

    app = web.Application(client_max_size=20 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", completions)
    async with local_http(app) as url:
        yield f"{url}/v1", seen


@pytest.fixture
def vision_gateway(nats_only, vision_model):
    base_url, _ = vision_model
    gateway = start_gateway(nats_only, vision__base_url=base_url, vision__model="vision-test")
    return gateway.ws_port, gateway.http_port


async def post(url: str, device_id: str, token: str, body: bytes) -> tuple[int, dict]:
    headers = {"Device-Id": device_id, "Client-Id": "c", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=chunked(body), headers=headers) as response:
            return response.status, await response.json(content_type=None)


async def test_camera_photo_explained(vision_gateway, vision_model):
    ws_port, _ = vision_gateway
    _, seen = vision_model
    async with SimDevice(ws_url=f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/") as device:
        for _ in range(50):
            if device.vision:
                break
            await asyncio.sleep(0.05)
        url, token = device.vision["url"], device.vision["token"]
        status, answer = await post(url, device.device_id, token, firmware_body("What do you see?", JPEG))
        assert status == 200
        assert answer == {"success": True, "action": "RESPONSE", "response": "I see a small test picture."}
        request = seen[-1]
        assert request["model"] == "vision-test"
        parts = request["messages"][-1]["content"]
        assert parts[0] == {"type": "text", "text": "What do you see?"}
        assert parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,/9j/")

        # Token problems are 401 with a JSON message.
        for bad_device, bad_token in ((device.device_id, ""), (device.device_id, "v1.x.1.y"), ("ff:ff:ff:ff:ff:ff", token)):
            status, answer = await post(url, bad_device, bad_token, firmware_body("q", JPEG))
            assert status == 401 and answer["success"] is False and answer["message"]
        # Bad images are clear errors.
        status, answer = await post(url, device.device_id, token, firmware_body("q", b"just some text, not an image"))
        assert status == 200 and answer["success"] is False and "format" in answer["message"]
        status, answer = await post(url, device.device_id, token, firmware_body("q", b"\xff\xd8\xff" + b"\x00" * (5 * 1024 * 1024 + 10)))
        assert answer["success"] is False and "larger" in answer["message"]
        status, answer = await post(url, device.device_id, token, f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nq\r\n--{BOUNDARY}--\r\n".encode())
        assert answer["success"] is False and "no image" in answer["message"]
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                assert response.status == 200 and "vision-test" in await response.text()


async def test_the_camera_works_for_the_whole_session_and_not_after(nats_only, vision_model):
    """The token in MCP initialize lasts as long as its session, past auth.vision_ttl_seconds
    (1 s here), on any gateway replica; once the session ended it is refused. The URL names the
    host the device reached the gateway at (here `localhost`: no public host is set)."""
    base_url, _ = vision_model
    settings = {"vision__base_url": base_url, "vision__model": "vision-test", "auth__vision_ttl_seconds": "1", "public_host": "",
                "auth__key": "k" * 40}  # one key: the replicas verify each other's tokens
    first = start_gateway(nats_only, **settings)
    other = start_gateway(nats_only, **settings)
    async with SimDevice(ws_url=f"ws://localhost:{first.ws_port}/xiaozhi/v1/") as device:
        for _ in range(50):
            if device.vision:
                break
            await asyncio.sleep(0.05)
        url, token = device.vision["url"], device.vision["token"]
        assert url == f"http://localhost:{first.http_port}/mcp/vision/explain"
        await asyncio.sleep(2.2)  # past the TTL
        for endpoint in (url, f"{other.http_url}/mcp/vision/explain"):  # this replica and another
            status, answer = await post(endpoint, device.device_id, token, firmware_body("What do you see?", JPEG))
            assert status == 200 and answer["success"] is True, (endpoint, answer)
    for _ in range(50):
        status, answer = await post(url, device.device_id, token, firmware_body("q", JPEG))
        if status == 401:
            break
        await asyncio.sleep(0.1)
    assert status == 401 and "ended" in answer["message"]
    status, answer = await post(f"{other.http_url}/mcp/vision/explain", device.device_id, token, firmware_body("q", JPEG))
    assert status == 401 and "ended" in answer["message"]


async def test_behind_a_port_forward_the_camera_url_names_the_forwarded_address(nats_only, vision_model):
    """As behind Docker's or a home router's port forward: the device reaches the gateway at an
    address that is none of the gateway's own (127.0.0.2 here, forwarded to 127.0.0.1), and no
    public host is set. The camera URL names that address, not the gateway's LAN address."""
    base_url, _ = vision_model
    gateway = start_gateway(nats_only, vision__base_url=base_url, vision__model="vision-test", public_host="")

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", gateway.ws_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    try:
        server = await asyncio.start_server(forward, "127.0.0.2", 0)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.2: {exc}")
    port = server.sockets[0].getsockname()[1]
    try:
        async with SimDevice(ws_url=f"ws://127.0.0.2:{port}/xiaozhi/v1/") as device:
            for _ in range(50):
                if device.vision:
                    break
                await asyncio.sleep(0.05)
            assert device.vision["url"] == f"http://127.0.0.2:{gateway.http_port}/mcp/vision/explain"
            status, answer = await post(f"{gateway.http_url}/mcp/vision/explain", device.device_id, device.vision["token"], firmware_body("q", JPEG))
            assert status == 200 and answer["success"] is True, answer
    finally:
        server.close()
