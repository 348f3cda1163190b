"""The OTA endpoint (protocol.md §1): tells a booting device the time and where to connect."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from gateway import auth, firmware
from gateway import metrics as m
from gateway.limits import ClientAddress, RateLimiter
from shared.bindings import BOUND, BindingStore, Lookup, StoreUnavailable
from shared.settings import GatewaySettings

log = logging.getLogger("gateway.ota")

# The vision endpoint's CORS headers (gateway/vision.py). OTA sends none unless
# ``gateway.ota_cors_origins`` names the origin (see ``cors_headers``).
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "client-id, content-type, device-id, authorization, protocol-version, activation-version",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Credentials": "true",
}

# The OTA URL forms served, and where the firmware's activation URL then points.
OTA_PATHS = ("/xiaozhi/ota", "/xiaozhi/ota/", "/ota", "/ota/", "/")
ACTIVATE_PATHS = ("/xiaozhi/ota/activate", "/ota/activate", "/activate")


# Device-Ids OTA accepts: MACs and the like. ``default`` names the deployment's default agent
# and ``web-…`` are the console's devices (issued by the manager, never through OTA).
DEVICE_ID = re.compile(r"[A-Za-z0-9:._-]{1,64}")
CLIENT_ID = re.compile(r"[A-Za-z0-9:._-]{1,128}")


def device_id_problem(device_id: str, for_ota: bool = True) -> str | None:
    """Why this Device-Id is refused (a metrics label), or None when it is fine."""
    if not device_id:
        return "no_device_id"
    if not DEVICE_ID.fullmatch(device_id):
        return "bad_device_id"
    if device_id.lower() == "default":
        return "reserved_device_id"
    if for_ota and device_id.lower().startswith("web-"):
        return "reserved_device_id"
    return None


def cors_headers(settings: GatewaySettings, request: web.Request) -> dict[str, str]:
    """CORS headers only for an origin the operator listed (devices send no Origin)."""
    origin = request.headers.get("Origin", "")
    if origin and origin in settings.ota_cors_origins:
        return {**CORS_HEADERS, "Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


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


# A host name or address as a Host header may carry it (no port, no user, nothing else).
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def host_only(host_header: str | None) -> str | None:
    """The host of a ``Host`` header (``name:port``, ``[v6]:port``), or None when it is none."""
    host = (host_header or "").strip()
    if host.startswith("["):
        host = host.split("]")[0] + "]"
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host if _HOST.fullmatch(host) else None


def vision_url(settings: GatewaySettings, http_port: int | None = None, request_host: str | None = None) -> str:
    """The vision endpoint handed to devices in MCP initialize (protocol.md §8): the configured
    URL or public host, else the host this device's WebSocket handshake named (the address it
    reached us at: behind Docker or a NAT's port forward, not this machine's own), else the LAN
    address. The Host is taken as it is, unlike in OTA: this URL goes only to the connection
    that sent it, in its own session."""
    if settings.vision.url:
        return settings.vision.url
    host = settings.public_host or host_only(request_host) or lan_ip()
    scheme = "https" if settings.tls_cert_file else "http"
    return f"{scheme}://{host}:{http_port or settings.http_port}/mcp/vision/explain"


def local_timezone_offset_minutes() -> int:
    return -(time.altzone if time.daylight and time.localtime().tm_isdst else time.timezone) // 60


def timezone_warning(settings: GatewaySettings) -> str | None:
    """Why devices' clocks would show UTC (a container's time zone), or None: no
    ``gateway.timezone_offset_minutes`` and a server clock at offset 0."""
    if settings.timezone_offset_minutes is None and local_timezone_offset_minutes() == 0:
        return "no gateway.timezone_offset_minutes and the server runs in UTC: devices' clocks show UTC unless their agent sets an offset (e.g. 480 for China)"
    return None


def own_hosts(settings: GatewaySettings) -> set[str]:
    """Names of this machine a request's Host header may carry and be believed."""
    hosts = {"127.0.0.1", "::1", "[::1]", "localhost", lan_ip()}
    if settings.public_host:
        hosts.add(settings.public_host.lower())
    return hosts


def websocket_url(settings: GatewaySettings, request_host: str | None = None, own: set[str] | None = None) -> str:
    """The WebSocket URL handed to devices: the configured URL or host, else the request's host
    when it is one of this machine's own names (never an arbitrary Host header), else the LAN
    address."""
    if settings.websocket_url:
        return settings.websocket_url
    trusted = request_host if request_host and request_host.lower() in (own if own is not None else own_hosts(settings)) else None
    host = settings.public_host or trusted or lan_ip()
    scheme = "wss" if settings.tls_cert_file else "ws"
    return f"{scheme}://{host}:{settings.ws_port}{settings.ws_path}"


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
    own: set[str] | None = None,
    timezone_offset: int | None = None,
) -> dict[str, Any]:
    """The JSON answer of §1.4: server time, firmware, websocket (never mqtt), activation.

    ``timezone_offset``: the device's agent's (None: ``gateway.timezone_offset_minutes``, else
    the server's local offset)."""
    websocket: dict[str, Any] = {"url": websocket_url(settings, request_host, own), "token": token}
    if settings.protocol_version in (1, 2, 3):
        websocket["version"] = settings.protocol_version
    offset = timezone_offset if timezone_offset is not None else settings.timezone_offset_minutes
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


def base_url(settings: GatewaySettings, request: web.Request, own: set[str]) -> str:
    """Where firmware downloads are: the request's Host when it names this machine (or the
    configured public host, as behind an ingress), else the public host or LAN address and the
    port the request came in on."""
    host = _request_host(request)
    if host and host.lower() in own:
        return f"{request.scheme}://{request.host}"
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else settings.http_port
    return f"{request.scheme}://{settings.public_host or lan_ip()}:{port}"


def activation_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The HMAC answer of an /activate body: the firmware's own, or py-xiaozhi's ``Payload``."""
    payload = body.get("Payload") if isinstance(body.get("Payload"), dict) else body
    return payload if isinstance(payload, dict) else {}


def chip_proof(keys: auth.DeviceKeys, device_id: str, serial: str | None) -> tuple[str | None, bool] | str:
    """The (serial, needs_proof) a new code records, or why the request is refused (a metrics label).

    A MAC listed in the keys file needs its own chip's proof whatever the request says: leaving
    out ``Serial-Number`` or ``Activation-Version`` must not lower the bar, and a serial that is
    not that chip's (another MAC's, or none listed) is refused. A listed serial without a MAC
    needs its proof when a request names it."""
    chip = keys.serial_of(device_id)
    if chip is not None:
        return "serial_mismatch" if serial is not None and serial != chip else (chip, True)
    if serial is not None and serial in keys.keys:
        return "serial_mismatch" if keys.mac_of(serial) is not None else (serial, True)
    return serial, False


# What a system-info the JSON parser refused still tells (the firmware builds it by hand: an
# SSID with `"` or bytes that are not UTF-8 break it). The board object opens with its type.
_RAW_BOARD_TYPE = re.compile(rb'"board"\s*:\s*\{\s*"type"\s*:\s*"([A-Za-z0-9._-]{1,100})"')
_RAW_APP_VERSION = re.compile(rb'"application"\s*:\s*\{[^{}]*?"version"\s*:\s*"([0-9.]{1,32})"')
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def salvaged_body(raw: bytes, user_agent: str) -> dict[str, Any]:
    """The board and version of a body that is not JSON, so such a device is still offered its
    upgrade (the new firmware may be what fixes the body): the board type from the raw bytes
    (it comes before the SSID), else the board name of ``User-Agent: <board>/<version>``
    (``BOARD_NAME``, which defaults to the type); the version from ``User-Agent`` (the running
    image's own), else from the raw bytes. {} when neither tells anything."""
    agent_board, _, agent_version = user_agent.strip().partition("/")
    found = _RAW_BOARD_TYPE.search(raw)
    board = found.group(1).decode() if found else (agent_board if _NAME.fullmatch(agent_board) else "")
    version = agent_version.strip()
    if firmware.parse_version(version) is None:
        found = _RAW_APP_VERSION.search(raw)
        version = found.group(1).decode() if found and firmware.parse_version(found.group(1).decode()) else ""
    body: dict[str, Any] = {}
    if board:
        body["board"] = {"type": board}
    if version:
        body["application"] = {"version": version}
    return body


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
    on_seen: Callable[[dict[str, Any], bool], None] | None = None,
    catalog: Any = None,
    device_keys: auth.DeviceKeys | None = None,
    not_before: Callable[[str], float | None] | None = None,
    agents: Any = None,
    session_open: Callable[[str, str], Awaitable[bool]] | None = None,
) -> web.Application:
    """The HTTP app on :8003: OTA on every URL form users type, activation, firmware downloads.

    ``on_seen(event, trusted)`` hears of every device that asked OTA, with its Client-Id and the
    board and firmware version its system-info names; ``trusted`` is True only when the request
    is the bound pair (or an allow-listed device), the only ones whose word the manager shows.

    Tokens (``gateway.auth.enabled``) go only to the bound pair (binding on) or allow-listed
    devices (empty token: none needed); any other device gets activation and no token.
    ``not_before(device_id)``: the device's last unbind; a token is never dated before it
    (it would be refused as revoked).

    ``device_keys``: per-chip keys; a listed MAC's code needs its chip's proof, and with
    ``auth.require_device_keys`` a MAC not listed gets no code at all.

    ``agents`` (an ``AgentDirectory``): the bound device's agent may set its clock's offset
    (``timezone_offset_minutes``); an unbound device is nobody's yet and gets the gateway's.
    """
    own = own_hosts(settings)
    keys = device_keys or auth.DeviceKeys()
    require_keys = settings.auth.require_device_keys
    limiter = RateLimiter(settings.rate_limits.ota_per_minute_per_ip)
    device_limiter = RateLimiter(settings.rate_limits.ota_per_minute_per_device)
    client_address = ClientAddress(settings.trusted_proxies)
    auth_on = settings.auth.enabled
    full_logged = {"at": -1e9, "count": 0}  # the "codes full" warning, at most every 10 s

    def refuse(method: str, result: str, status: int, message: str, headers: dict[str, str], **extra: str) -> web.Response:
        m.OTA_REQUESTS.labels(method, result).inc()
        return web.json_response({"success": False, "message": message}, status=status, headers={**headers, **extra})

    def slow_down(method: str, result: str, headers: dict[str, str]) -> web.Response:
        return refuse(method, result, 429, "too many requests, slow down", headers, **{"Retry-After": "10"})

    async def admitted(request: web.Request, method: str, headers: dict[str, str]) -> web.Response | tuple[str, str, Lookup | None]:
        """The Device-Id check and the rate limits, shared by OTA and /activate: the refusal, or
        the request's (Device-Id, Client-Id (the Device-Id when it has none), what the binding
        store says of the pair (None without binding)).

        The per-address budget is paid only by requests that prove nothing, as in the WebSocket
        handshake: the bound pair is limited per pair instead, so someone behind the device's
        own address (a home NAT) cannot use the budget up to keep the device from booting. An
        allow-listed id proves nothing (anyone can send it, with any Client-Id): it pays per
        address. Ids are checked before the store is asked; the state is looked up once."""
        now = time.monotonic()
        ip = client_address(request.remote or "unknown", request.headers.get("X-Forwarded-For"))
        device_id = request.headers.get("Device-Id", "").strip()
        client_id = request.headers.get("Client-Id", "").strip()
        problem = device_id_problem(device_id)
        if problem is None and client_id and not CLIENT_ID.fullmatch(client_id):
            problem = "bad_client_id"
        if problem is not None:
            if not limiter.allow(ip, now):
                return slow_down(method, "rate_limited", headers)
            log.info("ota request refused", extra={"fields": {"why": problem, "device_id": device_id[:80], "ip": request.remote}})
            return refuse(method, problem, 400, "Device-Id must be 1-64 of A-Z a-z 0-9 : . _ - (not default, not web-...); Client-Id likewise, up to 128", headers)
        client_id = client_id or device_id
        found = None
        if bindings is not None:
            try:
                found = await bindings.lookup(device_id, client_id)
            except StoreUnavailable as exc:
                return store_down(method, device_id, exc, headers)
        if found is not None and found.state == BOUND:
            if not device_limiter.allow(f"{device_id.lower()}|{client_id}", now):
                return slow_down(method, "device_rate_limited", headers)
        elif not limiter.allow(ip, now):
            return slow_down(method, "rate_limited", headers)
        return device_id, client_id, found

    def no_chip_key(method: str, request: web.Request, device_id: str, headers: dict[str, str]) -> web.Response:
        """``auth.require_device_keys``: this MAC has no key in the file, so it never activates."""
        log.warning("activation refused: the device's MAC has no chip key", extra={"fields": {"device_id": device_id, "ip": request.remote}})
        return refuse(method, "no_chip_key", 403, "this device has no chip key here: it cannot be activated", headers)

    def store_down(method: str, device_id: str, exc: Exception, headers: dict[str, str]) -> web.Response:
        """The shared binding store cannot be reached: whether the pair is bound cannot be told,
        so no token and no code (503; the firmware retries)."""
        m.ERRORS.labels("gateway", "binding_store").inc()
        log.warning("binding store unavailable: answering 503: %s", exc, extra={"fields": {"device_id": device_id}})
        return refuse(method, "store_unavailable", 503, "server busy, try again later", headers, **{"Retry-After": "30"})

    async def options(request: web.Request) -> web.Response:
        return web.Response(status=200, headers=cors_headers(settings, request))

    async def get(request: web.Request) -> web.Response:
        m.OTA_REQUESTS.labels("GET", "ok").inc()
        url = websocket_url(settings, _request_host(request), own)
        return web.Response(text=f"OTA interface is running, websocket address sent to devices: {url}\n", headers=cors_headers(settings, request))

    async def post(request: web.Request) -> web.Response:
        cors = cors_headers(settings, request)
        ids = await admitted(request, "POST", cors)
        if isinstance(ids, web.Response):
            return ids
        device_id, client_id, found = ids
        state = found.state if found is not None else None
        body: dict[str, Any] = {}
        raw = await request.read()
        if raw:
            try:
                parsed = json.loads(raw)
                if isinstance(parsed, dict):
                    body = parsed
            except ValueError:  # UnicodeDecodeError too
                m.OTA_REQUESTS.labels("POST", "bad_body").inc()
                body = salvaged_body(raw, request.headers.get("User-Agent", ""))
                log.info(
                    "ota body is not JSON; answering from what it and the User-Agent tell",
                    extra={"fields": {"device_id": device_id, "board": body.get("board", {}).get("type"), "version": body.get("application", {}).get("version")}},
                )
        allowed = auth.allow_listed(settings.auth.allowed_devices, device_id)
        activation = None
        if bindings is not None and state != BOUND:
            if require_keys and keys.serial_of(device_id) is None:
                return no_chip_key("POST", request, device_id, cors)
            proof = chip_proof(keys, device_id, request.headers.get("Serial-Number", "").strip()[:64] or None)
            if isinstance(proof, str):
                log.warning(
                    "activation refused: the Serial-Number is not the chip listed for this MAC",
                    extra={"fields": {"device_id": device_id, "serial": request.headers.get("Serial-Number", "")[:64], "chip": keys.serial_of(device_id), "ip": request.remote}},
                )
                return refuse("POST", proof, 403, "Serial-Number does not match this device's chip", cors)
            serial, needs_proof = proof
            try:
                pending = await bindings.pending_code(device_id, client_id, serial, needs_proof, not_before=found.not_before if found else 0.0)
            except StoreUnavailable as exc:
                return store_down("POST", device_id, exc, cors)
            if pending is None:
                m.OTA_REQUESTS.labels("POST", "codes_full").inc()
                m.DROPPED.labels("gateway", "activation_codes_full").inc()
                full_logged["count"] += 1
                if time.monotonic() - full_logged["at"] >= 10:
                    log.warning(
                        "no activation code free: answering 503",
                        extra={"fields": {"device_id": device_id, "max_pending_codes": settings.max_pending_codes, "refused_since_last_warning": full_logged["count"]}},
                    )
                    full_logged.update(at=time.monotonic(), count=0)
                return web.json_response({"success": False, "message": "activation is busy, try again later"}, status=503, headers={**cors, "Retry-After": "60"})
            activation = {"code": pending.code, "message": f"{settings.console_url}\n{pending.code}", "challenge": pending.challenge, "timeout_ms": 30000}
            log.info("activation code issued", extra={"fields": {"device_id": device_id, "client_id": client_id, "state": state}})
        token = ""
        if auth_on and not allowed and state == BOUND:
            issued = int(time.time())
            revoked_until = max((not_before(device_id.lower()) or 0.0) if not_before is not None else 0.0, found.not_before if found else 0.0)
            if revoked_until and issued < revoked_until:
                issued = math.ceil(revoked_until)  # re-bound within the second of an unbind
            token = auth.issue_device_token(auth_key, client_id, device_id, issued)
        stored, allow = None, True
        if catalog is not None:
            # The manager's images (object store) and the owner's auto-upgrade switch.
            board = body.get("board") if isinstance(body.get("board"), dict) else {}
            allow = await catalog.auto_upgrade(device_id)
            stored = await catalog.newest(str(board.get("type") or "")) if allow else None
        offset = None
        if agents is not None and (bindings is None or state == BOUND):
            agent = await agents.get(device_id)
            offset = agent.timezone_offset_minutes if agent is not None else None
        response = build_ota_response(
            settings, body, _request_host(request), token=token, base_url=base_url(settings, request, own),
            activation=activation, stored=stored, allow_upgrade=allow, own=own, timezone_offset=offset,
        )
        m.OTA_REQUESTS.labels("POST", "ok").inc()
        log.info("ota", extra={"fields": {"device_id": device_id, "client_id": client_id, "user_agent": request.headers.get("User-Agent"), "state": state}})
        if on_seen is not None:
            # Who may tell the manager its board, firmware and last-seen: the bound pair, an
            # allow-listed device; without binding or auth nothing can be checked.
            trusted = state == BOUND or (auth_on and allowed) or (bindings is None and not auth_on)
            on_seen({"device_id": device_id, "client_id": client_id, "event": "ota", **device_info(body, request.headers.get("User-Agent", ""))}, trusted)
        return web.json_response(response, headers=cors)

    async def activate(request: web.Request) -> web.Response:
        """The device polls until its owner entered the code: 202 until its pair is bound, 200
        after; a device whose chip key is known must answer its challenge (403 otherwise), and
        with ``auth.require_device_keys`` a MAC without a key is refused (403)."""
        cors = cors_headers(settings, request)
        ids = await admitted(request, "ACTIVATE", cors)
        if isinstance(ids, web.Response):
            return ids
        device_id, client_id, found = ids
        state = found.state if found is not None else None
        raw = await request.read()
        if bindings is None or state == BOUND:
            m.OTA_REQUESTS.labels("ACTIVATE", "bound").inc()
            return web.Response(text="success", headers=cors)
        if require_keys and keys.serial_of(device_id) is None:
            return no_chip_key("ACTIVATE", request, device_id, cors)
        try:
            pending = await bindings.pending(device_id, client_id, not_before=found.not_before if found else 0.0)
        except StoreUnavailable as exc:
            return store_down("ACTIVATE", device_id, exc, cors)
        if pending is not None and not pending.verified and pending.serial in keys.keys:
            try:
                answer = activation_answer(json.loads(raw) if raw else {})
            except ValueError:
                answer = {}
            challenge, mac = answer.get("challenge"), answer.get("hmac")
            serial = answer.get("serial_number")
            ok = (
                isinstance(challenge, str) and isinstance(mac, str) and challenge == pending.challenge
                and (serial is None or serial == pending.serial)
                and auth.verify_activation(keys.keys[pending.serial], pending.challenge, mac)  # type: ignore[index]
            )
            if not ok:
                m.OTA_REQUESTS.labels("ACTIVATE", "bad_hmac").inc()
                m.AUTH_FAILURES.labels("activation hmac").inc()
                log.warning("activation answer does not match the chip's key", extra={"fields": {"device_id": device_id, "serial": pending.serial, "ip": request.remote}})
                return web.Response(status=403, text="activation challenge answer is wrong", headers=cors)
            try:
                await bindings.mark_verified(device_id, client_id)
            except StoreUnavailable as exc:
                return store_down("ACTIVATE", device_id, exc, cors)
            log.info("activation answer verified", extra={"fields": {"device_id": device_id, "serial": pending.serial}})
        m.OTA_REQUESTS.labels("ACTIVATE", "pending").inc()
        return web.Response(status=202, text="waiting for the owner to enter the code", headers=cors)

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
    # Since firmware 2.4.1 users type the OTA URL in the Wi-Fi portal: the documented one, the
    # short one, or only the host and port (a request for "/"). Nothing else answers "/" here
    # (metrics and health are on their own port, the WebSocket on its own).
    for path in OTA_PATHS:
        app.router.add_get(path, get)
        app.router.add_post(path, post)
        app.router.add_route("OPTIONS", path, options)
    # The firmware appends "activate" to an OTA URL ending in "/", else "/activate" (ota.cc):
    # every form above leads to one of these.
    for path in ACTIVATE_PATHS:
        app.router.add_post(path, activate)
        app.router.add_route("OPTIONS", path, options)
    app.router.add_get("/xiaozhi/ota/download/{name}", download)
    from gateway import vision  # vision imports this module's CORS headers

    vision.add_routes(app, settings, auth_key, session_open)
    return app
