"""The manager's OpenAPI spec, run through schemathesis against the real service: generated
valid and invalid requests for every operation, signed in, checking that nothing answers 5xx,
that every answer matches the documented status codes and schemas, and that invalid input is
rejected."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def database_url(tmp_path_factory):
    # One database is enough here; tests/manager/test_api.py covers the three servers.
    return f"sqlite:///{tmp_path_factory.mktemp('openapi') / 'manager.db'}"


def schemathesis_binary() -> str | None:
    beside = Path(sys.executable).parent / "schemathesis"
    return str(beside) if beside.exists() else shutil.which("schemathesis")


def test_the_openapi_spec_holds_under_schemathesis(manager, tmp_path):
    binary = schemathesis_binary()
    if binary is None:
        pytest.skip("schemathesis not installed (pip install schemathesis)")
    admin = manager.admin()
    status, created = admin.call("POST", "/api/tokens", {"name": "schemathesis"})
    assert status == 201
    spec = admin.call("GET", "/openapi.json")[1]
    assert {"/api/auth/login", "/api/agents", "/api/devices", "/api/devices/bind", "/api/tokens", "/api/users", "/api/devices/{device_id}/notice", "/api/devices/{device_id}/reboot"} <= set(spec["paths"])
    result = subprocess.run(
        [
            binary, "run", f"{manager.base}/openapi.json",
            "--header", f"Authorization: Bearer {created['token']}",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection",
            # The signed-in user must stay usable for the whole run.
            "--exclude-path", "/api/me/password",
            "--max-examples", "15",
            "--phases", "examples,coverage,fuzzing",
            "--workers", "1",
            "--seed", "7",
            "--no-color",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    (tmp_path / "schemathesis.txt").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # The service survived it.
    assert admin.call("GET", "/api/me")[0] == 200
