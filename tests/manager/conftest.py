"""The manager as a real process against a real database server and a real nats-server.

Databases: SQLite (a temp file), and MariaDB/MySQL and PostgreSQL on the servers this machine
runs, reached by URL (``XZ_TEST_MYSQL_URL``, ``XZ_TEST_POSTGRES_URL``; `.ci/run` sets them).
Each test module creates its own database and drops it afterwards; where a server cannot be
reached the tests for it skip and say why.
"""

from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import start_nats
from xiaozhi.stack import Stack, free_port

MYSQL_URL = os.environ.get("XZ_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
POSTGRES_URL = os.environ.get("XZ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
ADMIN_PASSWORD = "admin-" + secrets.token_urlsafe(8)


def _server_database(server_url: str, kind: str) -> Iterator[str]:
    """CREATE DATABASE on the server, yield its URL, DROP it afterwards."""
    name = f"xz_test_{secrets.token_hex(4)}"
    try:
        engine = create_engine(server_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}" + (" CHARACTER SET utf8mb4" if kind == "mysql" else "")))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{kind} server not reachable at {make_url(server_url).render_as_string(hide_password=True)}: {type(exc).__name__}: {exc}".splitlines()[0])
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            if kind == "postgres":
                conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "mysql", "postgres"])
def database_url(request, tmp_path_factory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('manager') / 'manager.db'}"
    elif request.param == "mysql":
        yield from _server_database(MYSQL_URL, "mysql")
    else:
        yield from _server_database(POSTGRES_URL, "postgres")


class Api:
    """A tiny JSON client for the manager's API (urllib: no test-only HTTP library)."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        bearer = token if token is not None else self.token
        if bearer:
            request.add_header("Authorization", f"Bearer {bearer}")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw) if raw else None
            except ValueError:
                return err.code, raw.decode(errors="replace")

    def get_bytes(self, path: str) -> tuple[int, bytes, str]:
        """GET a non-JSON body: (status, bytes, content type)."""
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type", "")

    def login(self, username: str, password: str) -> "Api":
        status, body = self.call("POST", "/api/auth/login", {"username": username, "password": password}, token="")
        assert status == 200, (status, body)
        return Api(self.base, body["token"])


def start_manager(stack: Stack, database_url: str, **env: str) -> tuple[str, object]:
    """A manager process on ``stack``'s NATS, on free ports, signed-in-able as admin; returns
    its base URL and the process. ``env``: more XZ_* settings."""
    port = free_port()
    proc = stack.start_service("manager", free_port(), {
        "XZ_MANAGER__HOST": "127.0.0.1",
        "XZ_MANAGER__PORT": str(port),
        "XZ_MANAGER__DATABASE_URL": database_url,
        "XZ_MANAGER__ADMIN_PASSWORD": ADMIN_PASSWORD,
        **env,
    })
    stack.wait_healthy([proc], timeout=90)
    return f"http://127.0.0.1:{port}", proc


@dataclass
class ManagerStack:
    stack: Stack
    base: str
    ota_url: str
    ws_url: str
    database_url: str
    log_dir: Path
    metrics_port: int

    def admin(self) -> Api:
        return Api(self.base).login("admin", ADMIN_PASSWORD)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def manager(database_url, tmp_path_factory) -> Iterator[ManagerStack]:
    """nats-server, a gateway with device binding on (it holds the activation codes), and the
    manager on ``database_url``."""
    tmp = tmp_path_factory.mktemp("mstack")
    stack = Stack(env={"XZ_LOG_JSON": "true", "PYTHONUNBUFFERED": "1"}, log_dir=tmp / "logs")
    try:
        start_nats(stack, tmp)
        ws_port, http_port = free_port(), free_port()
        gateway = stack.start_service("gateway", free_port(), {
            "XZ_GATEWAY__HOST": "127.0.0.1",
            "XZ_GATEWAY__WS_PORT": str(ws_port),
            "XZ_GATEWAY__HTTP_PORT": str(http_port),
            "XZ_GATEWAY__PUBLIC_HOST": "127.0.0.1",
            "XZ_GATEWAY__BINDING": "true",
            "XZ_GATEWAY__BINDING_DB": str(tmp / "bindings.db"),
            "XZ_GATEWAY__FIRMWARE_CACHE_S": "0.5",
        })
        stack.wait_healthy([gateway], timeout=90)
        base, mgr = start_manager(
            stack, database_url, XZ_MANAGER__LOGIN_ATTEMPTS_PER_MINUTE="5", XZ_MANAGER__HISTORY_MAX_LINES="6", XZ_MANAGER__LIVE_RESYNC_S="0.5",
            # What agents may choose: the manager reads the LLM and ASR stages' settings.
            XZ_LLM__PROVIDERS=json.dumps({"qwen": {"backend": "openai", "base_url": "http://vllm:8000/v1", "model": "Qwen/Qwen2.5-7B-Instruct"}}),
            XZ_ASR__ENGINES=json.dumps({"sensevoice": {"type": "openai", "base_url": "http://asr:8000/v1", "model": "FunAudioLLM/SenseVoiceSmall"}, "funasr": {"type": "funasr", "url": "ws://funasr:10095"}}),
        )
        yield ManagerStack(stack, base, f"http://127.0.0.1:{http_port}/xiaozhi/ota/", f"ws://127.0.0.1:{ws_port}/xiaozhi/v1/", database_url, tmp / "logs", mgr.metrics_port)
    finally:
        stack.stop()


async def audio_store(nc):
    """The xz_audio object store (the ASR's kept utterances), made when this test is first."""
    from nats.js.api import ObjectStoreConfig

    js = nc.jetstream()
    try:
        return await js.object_store("xz_audio")
    except Exception:  # noqa: BLE001 - not there yet
        return await js.create_object_store("xz_audio", config=ObjectStoreConfig(bucket="xz_audio"))
