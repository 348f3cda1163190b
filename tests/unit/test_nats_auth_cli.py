"""`xiaozhi nats-auth --secrets-dir`: the files the Kubernetes Secret (flat) and compose's
one-shot service (--per-service-dirs, one folder per container) are made of, and --if-missing
keeping the passwords across restarts and upgrades."""

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
    # The passwords are kept, the config is this version's (rendered from them again).
    (tmp_path / "auth.conf").write_text("# an older version's users block\n")
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


def files_of(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_per_service_dirs_give_each_container_a_folder_of_its_own(tmp_path):
    """compose mounts each container one folder of the secrets volume: a service's folder holds
    its password only, nats/ the server's config only."""
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--per-service-dirs"]) == 0
    files = files_of(tmp_path)
    assert set(files) == {"nats/auth.conf"} | {f"{user}/{user}.password" for user in natsauth.USERS}
    assert {p.name for p in tmp_path.iterdir()} == {"nats", *natsauth.USERS}  # nothing flat
    passwords = natsauth.read_passwords(tmp_path, per_service_dirs=True)
    assert files["nats/auth.conf"] == natsauth.render(passwords)
    assert len(set(passwords.values())) == len(natsauth.USERS)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        for file in path.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert not list(tmp_path.rglob(".*.tmp"))


def test_per_service_dirs_take_over_a_flat_volume_and_keep_its_passwords(tmp_path):
    """A compose volume from before the folders (flat: auth.conf, <user>.password): its
    passwords move into the folders, the flat files go, and auth.conf is rendered again (an
    older version's permissions would refuse what this version's services do)."""
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--if-missing"]) == 0
    flat = natsauth.read_passwords(tmp_path)
    (tmp_path / "auth.conf").write_text("# an older version's users block\n")
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--per-service-dirs", "--if-missing"]) == 0
    assert natsauth.read_passwords(tmp_path, per_service_dirs=True) == flat
    assert set(files_of(tmp_path)) == {"nats/auth.conf"} | {f"{user}/{user}.password" for user in natsauth.USERS}
    assert (tmp_path / "nats/auth.conf").read_text() == natsauth.render(flat)
    # Later starts keep them; a stale config is written anew from them.
    before = files_of(tmp_path)
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--per-service-dirs", "--if-missing"]) == 0
    assert files_of(tmp_path) == before
    (tmp_path / "nats/auth.conf").write_text("# stale\n")
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--per-service-dirs", "--if-missing"]) == 0
    assert files_of(tmp_path) == before
    # A password gone: all are made anew, consistently.
    (tmp_path / "tts/tts.password").unlink()
    assert main(["nats-auth", "--secrets-dir", str(tmp_path), "--per-service-dirs", "--if-missing"]) == 0
    fresh = natsauth.read_passwords(tmp_path, per_service_dirs=True)
    assert fresh is not None and fresh["gateway"] != flat["gateway"]
    assert (tmp_path / "nats/auth.conf").read_text() == natsauth.render(fresh)


def test_per_service_dirs_needs_a_folder(capsys):
    assert main(["nats-auth", "--per-service-dirs"]) == 2
    assert "--secrets-dir" in capsys.readouterr().err
