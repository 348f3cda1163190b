"""The dashboard, the alerts and the autoscalers against real tools and the running services.

- `promtool` (Debian's prometheus package; `make test` installs it where it can) checks the
  Prometheus configs and rules and runs the alerts' unit tests;
- every metric name used by the Grafana dashboard, the alert rules, the KEDA ScaledObjects, the
  HPAs and the prometheus-adapter rules exists in the `/metrics` of the running pipeline after
  simulated turns;
- a real Prometheus scrapes the running pipeline, evaluates the alert rules, and after
  simulated turns every query of the dashboard's main rows returns data.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import fixture_wav
from tests.deploy.promql import exported_names, metric_names
from xiaozhi.sim import SimDevice, read_wav
from xiaozhi.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import render_observability  # noqa: E402

DASHBOARD = ROOT / "deploy/observability/grafana/xiaozhi.json"
ALERTS = ROOT / "deploy/observability/alerts.yml"
ALERT_TESTS = ROOT / "deploy/observability/alerts_test.yml"
K8S = ROOT / "deploy/k8s"
COMPOSE_PROMETHEUS = ROOT / "deploy/compose/prometheus.yml"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus; `make test` installs it when run as root)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus; `make test` installs it when run as root)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL or "promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(row, panel title, expr) for every query of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    row = ""
    out = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel.get("targets", []):
            out.append((row, panel["title"], target["expr"]))
    return out


def _walk(node, key_path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, key_path + (key,))
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key_path)
    else:
        yield key_path, node


def autoscaler_names() -> tuple[dict[str, set[str]], set[str]]:
    """({where: metric names in queries}, names that prometheus-adapter rules define)."""
    used: dict[str, set[str]] = {}
    defined: set[str] = set()
    for path in sorted((K8S / "autoscaling").rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            kind = doc.get("kind", "")
            for keys, value in _walk(doc):
                if not isinstance(value, str):
                    continue
                where = f"{path.relative_to(ROOT)}:{'.'.join(keys)}"
                if keys[-1] in ("query", "seriesQuery", "metricsQuery"):
                    used[where] = metric_names(value)
                elif keys[-2:] == ("name", "as"):
                    defined.add(value)
                elif kind == "HorizontalPodAutoscaler" and keys[-2:] == ("metric", "name"):
                    used[where] = {value}
    return used, defined


# ---------------------------------------------------------------------------------------------
# Files and promtool


def test_generated_monitoring_files_are_up_to_date():
    assert render_observability.main(["--check"]) == 0, "run: python scripts/render_observability.py"


def test_dashboard_is_well_formed():
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert set(render_observability.MAIN_ROWS) <= set(rows)
    # Each query names at least one metric (a typo'd function would leave none).
    for row, title, expr in dashboard_targets():
        assert metric_names(expr), (row, title, expr)


def test_metric_name_extraction():
    # The check below is only as good as this: it must find names and skip everything else.
    assert metric_names('sum by (le) (rate(a_bucket{x="y",q=~"b|c"}[$__rate_interval])) * 0.06 > 1/60') == {"a_bucket"}
    assert metric_names("count by (service) (b offset 15m) unless count by (service) (c == 1e3)") == {"b", "c"}
    assert metric_names("sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)") == set()
    assert metric_names('histogram_quantile(0.95, sum by (le, tool) (rate(d_bucket[5m]))) or vector(0)') == {"d_bucket"}
    assert exported_names("# TYPE e counter\n# TYPE f histogram\ng{a=\"1\"} 2\n") >= {"e_total", "f_bucket", "f_count", "g"}


@needs_promtool
def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_checks_the_prometheusrule_resource(tmp_path: Path):
    (rule,) = [d for d in yaml_docs(K8S / "monitoring/prometheusrule.yaml") if d["kind"] == "PrometheusRule"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alerts_fire_as_their_unit_tests_say():
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path):
    assert COMPOSE_PROMETHEUS.is_file()
    config = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    # The rule files are mounted into the container; point them at the repository's copy.
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"gateway", "vad", "asr", "llm", "tts", "tools"} <= jobs


def test_autoscalers_query_metrics():
    used, _defined = autoscaler_names()
    kinds = {doc.get("kind") for p in (K8S / "autoscaling").rglob("*.yaml") for doc in yaml_docs(p)}
    assert {"ScaledObject", "HorizontalPodAutoscaler"} <= kinds
    assert used and all(names for names in used.values()), used


# ---------------------------------------------------------------------------------------------
# Against the running pipeline


async def speak_turns(pipeline) -> None:
    """A tool turn and a chat turn, spoken in real time as the firmware does."""
    for wav in ("en_what_time.wav", "en_joke.wav"):
        async with SimDevice(ws_url=pipeline.ws_url) as device:
            report = await device.speak(read_wav(fixture_wav(wav)))
            assert report.error is None, report


def live_names(pipeline) -> set[str]:
    names: set[str] = set()
    for port in pipeline.metrics.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            names |= exported_names(response.read().decode())
    return names


@pytest.mark.e2e
async def test_every_metric_name_in_dashboards_alerts_and_autoscalers_is_exported(pipeline):
    await speak_turns(pipeline)
    live = await asyncio.to_thread(live_names, pipeline)
    used: dict[str, set[str]] = {}
    for row, title, expr in dashboard_targets():
        used[f"dashboard {row}/{title}"] = metric_names(expr)
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            used[f"alert {rule.get('alert') or rule.get('record')}"] = metric_names(rule["expr"])
    scalers, adapter_defined = autoscaler_names()
    used.update(scalers)
    assert len(used) > 40, "too few queries found: is the collection broken?"
    missing = {where: sorted(names - live - adapter_defined) for where, names in used.items() if names - live - adapter_defined}
    assert not missing, f"metric names not exported by any running service: {missing}"
    # Names the adapter defines are for the HPAs; they must be made from exported series.
    for where, names in scalers.items():
        if "seriesQuery" in where or "metricsQuery" in where:
            assert names <= live, (where, names - live)


def _get(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def _query(base: str, expr: str) -> list:
    data = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", data
    return data["data"]["result"]


@pytest.fixture
def prometheus(pipeline, tmp_path: Path):
    """A real Prometheus scraping every service of the pipeline each second, with our rules."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package prometheus; `make test` installs it when run as root)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": service, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for service, port in pipeline.metrics.items()
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
                if len(targets) == len(pipeline.metrics) and all(t["health"] == "up" for t in targets):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape every service within 60 s"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.e2e
async def test_a_real_prometheus_scrapes_the_stack_and_the_dashboard_shows_data(pipeline, prometheus):
    await asyncio.sleep(2)  # a few scrapes before the turns, so rates have a baseline
    await speak_turns(pipeline)
    await asyncio.sleep(4)  # scrapes after the turns (each second)

    empty = []
    checked = 0
    for row, title, expr in dashboard_targets():
        if row not in render_observability.MAIN_ROWS:
            continue
        result = await asyncio.to_thread(_query, prometheus, expr.replace("$__rate_interval", "1m"))
        checked += 1
        if not result:
            empty.append(f"{row}/{title}: {expr}")
    assert checked >= 20
    assert not empty, "dashboard queries with no data after two turns:\n" + "\n".join(empty)

    # The numbers are the pipeline's, not just present: two turns were answered, one device
    # spoke at a time, and the stack's six services are connected.
    turns = await asyncio.to_thread(_query, prometheus, "sum(increase(xz_llm_turns_total[1m]))")
    assert float(turns[0]["value"][1]) >= 1.5
    connected = await asyncio.to_thread(_query, prometheus, "count by (service) (xz_nats_connected == 1)")
    assert {r["metric"]["service"] for r in connected} == set(pipeline.metrics)

    # Every alert rule evaluates without error against the real series.
    deadline = time.monotonic() + 15
    while True:
        groups = (await asyncio.to_thread(_get, f"{prometheus}/api/v1/rules"))["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, "rules not evaluated within 15 s"
        await asyncio.sleep(0.5)
    bad = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not bad, bad
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    # A healthy stack fires nothing.
    firing = [rule["name"] for rule in rules if rule.get("state") == "firing"]
    assert not firing, firing
