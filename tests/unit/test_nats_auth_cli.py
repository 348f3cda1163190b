"""`xiaozhi nats-auth --secrets-dir`: the files compose's one-shot service and the Kubernetes
Secret are made of, and --if-missing keeping them across restarts."""

from __future__ import annotations

import stat

from shared import natsauth
from xiaozhi.cli import main


def test_secrets_dir_gets_auth_conf_and_one_password_per_service(tmp_path, capsys):
    assert main(["nats-auth", "--secrets-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out == ""  # nothing secret on stdout when writing files
    conf = (tmp_path / "auth.conf").read_text()
    for service in natsauth.USERS:
        password = (tmp_path / f"{service}.password").read_text().strip()
        assert len(password) >= 24
        assert f'"{password}"' in conf
        assert stat.S_IMODE((tmp_path / f"{service}.password").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "auth.conf").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))


def test_if_missing_keeps_existing_secrets(tmp_path):
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--if-missing"]) == 0
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--if-missing"]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    # A password file gone (a new service added): all are written anew, consistently.
    (tmp_path / "tts.password").unlink()
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--if-missing"]) == 0
    conf = (tmp_path / "auth.conf").read_text()
    assert (tmp_path / "tts.password").read_text().strip() in conf
    assert before["auth.conf"] != conf


def test_if_missing_needs_a_folder(capsys):
    assert main(["nats-auth", "--if-missing"]) == 2
    assert "--secrets-dir" in capsys.readouterr().err
