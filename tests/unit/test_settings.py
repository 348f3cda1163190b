"""shared.settings.load_settings: defaults < YAML file < XZ_* environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared import settings as settings_mod
from shared.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """No XZ_* variable of the developer's shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("XZ_"):
            monkeypatch.delenv(name, raising=False)
    yield
    assert settings_mod._YAML_FILE["path"] is None  # load_settings cleans up after itself


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    s = load_settings()
    assert s.log_level == "INFO"
    assert s.log_json is True
    assert s.nats.url == "nats://127.0.0.1:4222"
    assert s.nats.max_reconnect_attempts == -1
    assert s.gateway.ws_port == 8000
    assert s.gateway.sample_rate == 24000
    assert s.gateway.frame_duration == 60
    assert s.gateway.prebuffer_frames == 5
    assert s.vad.min_silence_ms == 700
    assert s.vad.threshold == 0.5
    assert s.asr.model == "tiny.en"
    assert s.llm.backend == "llamacpp"
    assert s.tts.voice is None
    assert s.gateway.wake_words[0] == "你好小智"


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "log_level: DEBUG\n"
        "nats:\n  url: nats://yaml-host:4222\n"
        "vad:\n  min_silence_ms: 500\n  threshold: 0.6\n"
        "gateway:\n  wake_words: [hello robot]\n"
        "llm:\n  backend: openai\n",
    )
    s = load_settings(path)
    assert s.log_level == "DEBUG"
    assert s.nats.url == "nats://yaml-host:4222"
    assert s.vad.min_silence_ms == 500
    assert s.vad.threshold == 0.6
    assert s.gateway.wake_words == ["hello robot"]
    assert s.llm.backend == "openai"
    # fields the file does not mention keep their defaults, even inside a mentioned section
    assert s.vad.min_speech_ms == 250
    assert s.nats.prefix == "xz"
    assert s.asr.model == "tiny.en"


def test_yaml_path_as_string(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "asr:\n  model: base\n")
    assert load_settings(str(path)).asr.model == "base"


def test_env_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XZ_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("XZ_VAD__MIN_SILENCE_MS", "900")
    monkeypatch.setenv("XZ_NATS__URL", "nats://env-host:4333")
    monkeypatch.setenv("XZ_LOG_JSON", "false")
    s = load_settings()
    assert s.log_level == "WARNING"
    assert s.vad.min_silence_ms == 900
    assert isinstance(s.vad.min_silence_ms, int)
    assert s.nats.url == "nats://env-host:4333"
    assert s.log_json is False


def test_env_overrides_yaml_and_merges_nested_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(
        tmp_path,
        "log_level: DEBUG\n"
        "nats:\n  url: nats://yaml-host:4222\n  prefix: yamlprefix\n"
        "vad:\n  min_silence_ms: 500\n  threshold: 0.6\n",
    )
    monkeypatch.setenv("XZ_VAD__MIN_SILENCE_MS", "900")
    monkeypatch.setenv("XZ_NATS__URL", "nats://env-host:4333")
    s = load_settings(path)
    assert s.vad.min_silence_ms == 900  # env beats YAML
    assert s.nats.url == "nats://env-host:4333"
    assert s.vad.threshold == 0.6  # the rest of the YAML section survives
    assert s.nats.prefix == "yamlprefix"
    assert s.log_level == "DEBUG"


def test_env_list_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XZ_GATEWAY__WAKE_WORDS", '["alpha", "beta"]')
    assert load_settings().gateway.wake_words == ["alpha", "beta"]


def test_xz_config_names_the_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path, "gateway:\n  ws_port: 9999\n")
    monkeypatch.setenv("XZ_CONFIG", str(path))
    assert load_settings().gateway.ws_port == 9999


def test_argument_beats_xz_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write_yaml(tmp_path, "gateway:\n  ws_port: 1111\n", "env.yaml")
    arg_file = write_yaml(tmp_path, "gateway:\n  ws_port: 2222\n", "arg.yaml")
    monkeypatch.setenv("XZ_CONFIG", str(env_file))
    assert load_settings(arg_file).gateway.ws_port == 2222


def test_missing_config_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "nope.yaml")


def test_missing_xz_config_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XZ_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError):
        load_settings()


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path)


def test_yaml_does_not_leak_into_the_next_load(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "log_level: DEBUG\n")
    assert load_settings(path).log_level == "DEBUG"
    assert load_settings().log_level == "INFO"


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "")
    assert load_settings(path).vad.min_silence_ms == 700


def test_unknown_keys_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path, "not_a_setting: 1\n")
    monkeypatch.setenv("XZ_ALSO_NOT_A_SETTING", "x")
    assert load_settings(path).log_level == "INFO"


def test_bad_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XZ_VAD__MIN_SILENCE_MS", "soon")
    with pytest.raises(ValueError):
        load_settings()


def test_downlink_params_limited_to_what_the_firmware_decodes(monkeypatch):
    import pydantic
    import pytest as _pytest

    from shared.settings import load_settings as _load

    monkeypatch.setenv("XZ_GATEWAY__FRAME_DURATION", "50")
    with _pytest.raises(pydantic.ValidationError):
        _load()
    monkeypatch.setenv("XZ_GATEWAY__FRAME_DURATION", "20")
    monkeypatch.setenv("XZ_GATEWAY__SAMPLE_RATE", "22050")
    with _pytest.raises(pydantic.ValidationError):
        _load()
    monkeypatch.setenv("XZ_GATEWAY__SAMPLE_RATE", "16000")
    settings = _load()
    assert (settings.gateway.frame_duration, settings.gateway.sample_rate) == (20, 16000)


def test_nats_password_is_secret_and_can_come_from_a_file(tmp_path, monkeypatch) -> None:
    from shared.settings import load_settings

    monkeypatch.setenv("XZ_NATS__USER", "gateway")
    monkeypatch.setenv("XZ_NATS__PASSWORD", "hunter2-very-secret")
    settings = load_settings(None)
    assert settings.nats.secret() == "hunter2-very-secret"
    # Printing or dumping the settings (as a log line might) does not show it.
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in settings.model_dump_json()
    secret_file = tmp_path / "gateway.password"
    secret_file.write_text("from-a-mounted-secret\n")
    monkeypatch.delenv("XZ_NATS__PASSWORD")
    monkeypatch.setenv("XZ_NATS__PASSWORD_FILE", str(secret_file))
    assert load_settings(None).nats.secret() == "from-a-mounted-secret"
