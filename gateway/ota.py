"""The OTA endpoint (protocol.md §1): tells a booting device the time and where to connect."""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any, Callable

from aiohttp import web

from gateway import auth, firmware
from gateway import metrics as m
from gateway.bindings import BindingStore
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
    if settings.vision.url:
        return settings.vision.url
    host = settings.public_host or lan_ip()
    scheme = "https" if settings.tls_cert_file else "http"
    return f"{scheme}://{host}:{http_port or settings.http_port}/mcp/vision/explain"


def local_timezone_offset_minutes() -> int:
    return -(time.altzone if time.daylight and time.localtime().tm_isdst else time.timezone) // 60


def websocket_url(settings: GatewaySettings, request_host: str | None = None) -> str:
    """The WebSocket URL handed to devices."""
    if settings.websocket_url:
        return settings.websocket_url
    host = settings.public_host or (request_host if request_host and request_host not in ("0.0.0.0",) else None) or lan_ip()
    scheme = "wss" if settings.tls_cert_file else "ws"
    return f"{scheme}://{host}:{settings.ws_port}{settings.ws_path}"


def device_token(settings: GatewaySettings, key: str, device_id: str, client_id: str, now_s: int) -> str:
    """The token handed out by OTA: empty when auth is off or the device is allow-listed."""
    if not settings.auth.enabled or auth.allow_listed(settings.auth.allowed_devices, device_id):
        return ""
    return auth.issue_device_token(key, client_id, device_id, now_s)


def firmware_section(
    settings: GatewaySettings,
    body: dict[str, Any],
    base_url: str,
    stored: firmware.Image | None = None,
    allow_upgrade: bool = True,
) -> dict[str, Any]:
    """``firmware``: the newest image for the device's board when it is newer, else its own version.

    Images come from the gateway's folder and (``stored``) the manager's object store, the
    newer of the two; ``allow_upgrade`` False (the owner's switch) offers none."""
    application = body.get("application") if isinstance(body.get("application"), dict) else {}
    board = body.get("board") if isinstance(body.get("board"), dict) else {}
    version = application.get("version") if isinstance(application.get("version"), str) else ""
    current = firmware.parse_version(version)
    image = firmware.newer(firmware.newest_image(settings.firmware_dir, str(board.get("type") or "")), stored) if allow_upgrade else None
    if image is not None:
        image_version = firmware.parse_version(image.version)
        newer = current is None or image_version > current  # type: ignore[operator]
        # `force` makes the firmware install whatever it is given: only when the image differs
        # from what runs, or the device would flash, reboot and flash again for ever.
        forced = settings.firmware_force and image_version != current
        if newer or forced:
            section: dict[str, Any] = {"version": image.version, "url": f"{base_url}/xiaozhi/ota/download/{image.filename}"}
            if forced:
                section["force"] = 1
            return section
    return {"version": version if current is not None else "0.0.0", "url": ""}


def build_ota_response(
    settings: GatewaySettings,
    body: dict[str, Any],
    request_host: str | None,
    now_ms: int | None = None,
    token: str = "",
    base_url: str = "",
    activation: dict[str, Any] | None = None,
    stored: firmware.Image | None = None,
    allow_upgrade: bool = True,
) -> dict[str, Any]:
    """The JSON answer of §1.4: server time, firmware, websocket (never mqtt), activation."""
    websocket: dict[str, Any] = {"url": websocket_url(settings, request_host), "token": token}
    if settings.protocol_version in (1, 2, 3):
        websocket["version"] = settings.protocol_version
    offset = settings.timezone_offset_minutes
    if offset is None:
        offset = local_timezone_offset_minutes()
    response: dict[str, Any] = {
        "server_time": {"timestamp": now_ms if now_ms is not None else int(time.time() * 1000), "timezone_offset": offset},
        "firmware": firmware_section(settings, body, base_url, stored, allow_upgrade),
        "websocket": websocket,
    }
    if activation:
        response["activation"] = activation
    return response


def _request_host(request: web.Request) -> str | None:
    host = request.host or ""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host else None


def device_info(body: dict[str, Any], user_agent: str) -> dict[str, str | None]:
    """Board and firmware version from the OTA system-info, else from ``User-Agent: board/version``."""
    application = body.get("application") if isinstance(body.get("application"), dict) else {}
    board = body.get("board") if isinstance(body.get("board"), dict) else {}
    agent_board, _, agent_version = user_agent.partition("/")
    version = application.get("version") if isinstance(application.get("version"), str) else agent_version
    board_type = board.get("type") if isinstance(board.get("type"), str) else agent_board
    return {"board": (board_type or "")[:100] or None, "firmware_version": (version or "")[:64] or None}


def make_app(
    settings: GatewaySettings,
    auth_key: str,
    bindings: BindingStore | None = None,
    on_seen: Callable[[dict[str, Any]], None] | None = None,
    catalog: Any = None,
) -> web.Application:
    """The HTTP app on :8003: OTA on both URL forms, activation, firmware downloads, CORS.

    ``on_seen`` hears of every device that asked OTA, with the board and firmware version its
    system-info names (the manager shows them)."""

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
        activation = None
        if bindings is not None and not bindings.is_bound(device_id):
            code = bindings.pending_code(device_id)
            activation = {"code": code, "message": f"{settings.console_url}\n{code}", "challenge": device_id, "timeout_ms": 30000}
            log.info("activation code issued", extra={"fields": {"device_id": device_id}})
        base_url = f"{request.scheme}://{request.host}"
        stored, allow = None, True
        if catalog is not None:
            # The manager's images (object store) and the owner's auto-upgrade switch.
            board = body.get("board") if isinstance(body.get("board"), dict) else {}
            allow = await catalog.auto_upgrade(device_id)
            stored = await catalog.newest(str(board.get("type") or "")) if allow else None
        response = build_ota_response(settings, body, _request_host(request), token=token, base_url=base_url, activation=activation, stored=stored, allow_upgrade=allow)
        m.OTA_REQUESTS.labels("POST", "ok").inc()
        log.info("ota", extra={"fields": {"device_id": device_id, "client_id": client_id, "user_agent": request.headers.get("User-Agent")}})
        if on_seen is not None:
            on_seen({"device_id": device_id, "event": "ota", **device_info(body, request.headers.get("User-Agent", ""))})
        return web.json_response(response, headers=CORS_HEADERS)

    async def activate(request: web.Request) -> web.Response:
        """The device polls until its owner entered the code: 202 until bound, 200 after."""
        device_id = request.headers.get("Device-Id", "").strip()
        await request.read()  # any body: {} or the HMAC challenge answer (not verifiable here)
        if not device_id:
            return web.json_response({"success": False, "message": "Device-Id header is required"}, status=400, headers=CORS_HEADERS)
        if bindings is None or bindings.is_bound(device_id):
            m.OTA_REQUESTS.labels("ACTIVATE", "bound").inc()
            return web.Response(text="success", headers=CORS_HEADERS)
        m.OTA_REQUESTS.labels("ACTIVATE", "pending").inc()
        return web.Response(status=202, text="waiting for the owner to enter the code", headers=CORS_HEADERS)

    async def download(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = firmware.safe_path(settings.firmware_dir, name)
        if path is None and catalog is not None and firmware.SAFE_NAME.match(name):
            data = await catalog.read(name)
            if data is not None:
                m.OTA_REQUESTS.labels("DOWNLOAD", "ok").inc()
                # A whole body, so Content-Length is sent (the firmware refuses chunked downloads).
                return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})
        if path is None:
            m.OTA_REQUESTS.labels("DOWNLOAD", "rejected").inc()
            return web.Response(status=404, text="no such firmware image\n")
        m.OTA_REQUESTS.labels("DOWNLOAD", "ok").inc()
        # FileResponse sends Content-Length: the firmware refuses chunked downloads.
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    app = web.Application(client_max_size=settings.vision.max_image_bytes + 1024 * 1024)
    for path in ("/xiaozhi/ota", "/xiaozhi/ota/"):
        app.router.add_get(path, get)
        app.router.add_post(path, post)
        app.router.add_route("OPTIONS", path, options)
    # The firmware appends "activate" to an OTA URL ending in "/", else "/activate": both forms
    # of the OTA URL lead here.
    app.router.add_post("/xiaozhi/ota/activate", activate)
    app.router.add_route("OPTIONS", "/xiaozhi/ota/activate", options)
    app.router.add_get("/xiaozhi/ota/download/{name}", download)
    from gateway import vision  # vision imports this module's CORS headers

    vision.add_routes(app, settings, auth_key)
    return app
