"""The OTA endpoint (protocol.md §1): tells a booting device the time and where to connect."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

from aiohttp import web

from gateway import auth
from gateway import metrics as m
from shared.settings import GatewaySettings

log = logging.getLogger("gateway.ota")

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "client-id, content-type, device-id, authorization, protocol-version, activation-version",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Credentials": "true",
}


def lan_ip() -> str:
    """The address of the interface that routes outwards (no packet is sent)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(("10.255.255.255", 1))
        return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        sock.close()


def vision_url(settings: GatewaySettings, http_port: int | None = None) -> str:
    """The vision endpoint handed to devices in MCP initialize (protocol.md §8)."""
    host = settings.public_host or lan_ip()
    return f"http://{host}:{http_port or settings.http_port}/mcp/vision/explain"


def local_timezone_offset_minutes() -> int:
    return -(time.altzone if time.daylight and time.localtime().tm_isdst else time.timezone) // 60


def websocket_url(settings: GatewaySettings, request_host: str | None = None) -> str:
    """The WebSocket URL handed to devices."""
    if settings.websocket_url:
        return settings.websocket_url
    host = settings.public_host or (request_host if request_host and request_host not in ("0.0.0.0",) else None) or lan_ip()
    return f"ws://{host}:{settings.ws_port}{settings.ws_path}"


def device_token(settings: GatewaySettings, key: str, device_id: str, client_id: str, now_s: int) -> str:
    """The token handed out by OTA: empty when auth is off or the device is allow-listed."""
    if not settings.auth.enabled or device_id.lower() in {d.lower() for d in settings.auth.allowed_devices}:
        return ""
    return auth.issue_device_token(key, client_id, device_id, now_s)


def build_ota_response(settings: GatewaySettings, body: dict[str, Any], request_host: str | None, now_ms: int | None = None, token: str = "") -> dict[str, Any]:
    """The JSON answer of §1.4: server time, firmware (echoed: no upgrade), websocket. Never mqtt."""
    application = body.get("application") if isinstance(body.get("application"), dict) else {}
    version = application.get("version") if isinstance(application.get("version"), str) else None
    websocket: dict[str, Any] = {"url": websocket_url(settings, request_host), "token": token}
    if settings.protocol_version in (1, 2, 3):
        websocket["version"] = settings.protocol_version
    offset = settings.timezone_offset_minutes
    if offset is None:
        offset = local_timezone_offset_minutes()
    return {
        "server_time": {"timestamp": now_ms if now_ms is not None else int(time.time() * 1000), "timezone_offset": offset},
        "firmware": {"version": version if version and _numeric_version(version) else "0.0.0", "url": ""},
        "websocket": websocket,
    }


def _numeric_version(version: str) -> bool:
    return all(part.isdigit() for part in version.split(".")) and bool(version)


def _request_host(request: web.Request) -> str | None:
    host = request.host or ""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host else None


def make_app(settings: GatewaySettings, auth_key: str) -> web.Application:
    """The HTTP app on :8003: OTA on both URL forms, GET status, OPTIONS for browsers."""

    async def options(_request: web.Request) -> web.Response:
        return web.Response(status=200, headers=CORS_HEADERS)

    async def get(request: web.Request) -> web.Response:
        m.OTA_REQUESTS.labels("GET", "ok").inc()
        url = websocket_url(settings, _request_host(request))
        return web.Response(text=f"OTA interface is running, websocket address sent to devices: {url}\n", headers=CORS_HEADERS)

    async def post(request: web.Request) -> web.Response:
        device_id = request.headers.get("Device-Id", "").strip()
        if not device_id:
            m.OTA_REQUESTS.labels("POST", "no_device_id").inc()
            return web.json_response({"success": False, "message": "Device-Id header is required"}, status=400, headers=CORS_HEADERS)
        client_id = request.headers.get("Client-Id", "").strip() or device_id
        body: dict[str, Any] = {}
        raw = await request.read()
        if raw:
            try:
                parsed = json.loads(raw)
                if isinstance(parsed, dict):
                    body = parsed
            except ValueError:
                m.OTA_REQUESTS.labels("POST", "bad_body").inc()
                log.info("ota body is not JSON; answering anyway", extra={"fields": {"device_id": device_id}})
        token = device_token(settings, auth_key, device_id, client_id, int(time.time()))
        response = build_ota_response(settings, body, _request_host(request), token=token)
        m.OTA_REQUESTS.labels("POST", "ok").inc()
        log.info("ota", extra={"fields": {"device_id": device_id, "client_id": client_id, "user_agent": request.headers.get("User-Agent")}})
        return web.json_response(response, headers=CORS_HEADERS)

    app = web.Application(client_max_size=1024 * 1024)
    for path in ("/xiaozhi/ota", "/xiaozhi/ota/"):
        app.router.add_get(path, get)
        app.router.add_post(path, post)
        app.router.add_route("OPTIONS", path, options)
    return app
