"""deploy/k8s/, checked without a cluster.

- every built-in resource validates (strictly: no unknown field) against the Kubernetes API
  schemas shipped by `kubernetes-validate`, for the newest version it knows and for 1.30;
- every custom resource (KEDA ScaledObject, PodMonitor, PrometheusRule) validates against its
  CRD's schema (vendored in tests/fixtures/crd-schemas/), made strict the way the API server's
  strict field validation is;
- the kustomizations list every manifest, and only files that exist;
- every workload: requests and limits, probes, Pod Security "restricted", the labels; each
  xiaozhi service runs `xiaozhi run <service>` as the NATS user of the same name with only its
  own password key of the Secret `xiaozhi nats-auth` writes, and sets only real XZ_* settings;
- the ConfigMap's config.yaml is valid Settings (no unknown key) and points the services at the
  NATS and vLLM Services of these manifests; the Ingresses route to real gateway and manager
  routes;
- the autoscalers cover every pipeline service, with metric names the services export; the
  manager (not a pipeline stage, SQLite by default) stays at one replica, replaced with Recreate;
- the NetworkPolicies admit what the stack needs and nothing else that was checked;
- a real 3-node nats-server cluster runs the NATS ConfigMap's nats.conf with the auth.conf that
  `xiaozhi nats-auth --secrets-dir` writes: routes, JetStream with replicas 3, auth, probes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from nats.aio.client import Client as NATS

from shared import natsauth, workqueue
from shared.agents import open_bucket
from shared.settings import GatewaySettings, Settings, load_settings
from shared.subjects import Subjects
from tests.deploy.envcheck import _models_and_dicts, xz_env_is_valid
from tests.deploy.promql import metric_names
from xiaozhi.stack import MODULES, free_port, nats_server_binary, wait_tcp

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
CRD_SCHEMAS = ROOT / "tests/fixtures/crd-schemas"
METRICS_DOC = ROOT / "docs/metrics.md"
NAMESPACE = "xiaozhi"
IMAGE = "xiaozhi-nats:0.1.0"
SECRET = "xiaozhi-nats-auth"
# YAML files under deploy/k8s that are not Kubernetes resources.
NOT_RESOURCES = {"autoscaling/hpa/prometheus-adapter-values.yaml"}
# The oldest Kubernetes the manifests are checked against, besides the newest one.
OLDEST_K8S = "1.30.0"
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
# Pod Security "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
# The services an autoscaler owns. Not the manager: it is no pipeline stage (an API for people),
# and with its default SQLite database on a ReadWriteOnce volume it must stay at one replica.
AUTOSCALED = set(MODULES) - {"manager"}


# --- loading -----------------------------------------------------------------------------------


def rel(path: Path) -> str:
    return path.relative_to(K8S).as_posix()


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def resource_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and rel(p) not in NOT_RESOURCES)


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in resource_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((rel(path), doc))
    return docs


DOCS = documents()


def doc_id(item: tuple[str, dict]) -> str:
    path, doc = item
    return f"{path}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def group_version(doc: dict) -> tuple[str, str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    return group, version


def crd_schema_path(doc: dict) -> Path:
    group, version = group_version(doc)
    return CRD_SCHEMAS / f"{group}_{doc['kind']}_{version}.json"


def is_custom(doc: dict) -> bool:
    """A resource of a CRD: its group is not one of Kubernetes' own."""
    group, _ = group_version(doc)
    return "." in group and not group.endswith(".k8s.io")


BUILTIN = [d for d in DOCS if not is_custom(d[1])]
CUSTOM = [d for d in DOCS if is_custom(d[1])]


def find(kind: str, name: str | None = None, under: str = "") -> list[dict]:
    return [d for p, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name) and p.startswith(under)]


def one(kind: str, name: str) -> dict:
    found = find(kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads() -> list[dict]:
    return [d for _p, d in DOCS if d["kind"] in ("Deployment", "StatefulSet")]


def xiaozhi_deployments() -> dict[str, dict]:
    """The Deployments that run a xiaozhi service from the project image, by service."""
    out = {}
    for d in find("Deployment"):
        containers = d["spec"]["template"]["spec"]["containers"]
        if containers[0]["image"] == IMAGE:
            out[d["metadata"]["name"]] = d
    return out


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def config_text() -> str:
    return one("ConfigMap", "xiaozhi-config")["data"]["config.yaml"]


def k8s_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """config.yaml as the services load it (no XZ_* of this process in the way)."""
    for key in list(os.environ):
        if key.upper().startswith("XZ_"):
            monkeypatch.delenv(key)
    path = tmp_path / "config.yaml"
    path.write_text(config_text())
    return load_settings(path)


def mounted_file(pod: dict, container: dict, path: str) -> tuple[str, str, str] | None:
    """What a file path in a container comes from: ("configMap" | "secret", object name, key)."""
    target = PurePosixPath(path)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        base = PurePosixPath(mount["mountPath"])
        if base not in target.parents:
            continue
        inside = target.relative_to(base).as_posix()
        volume = volumes[mount["name"]]
        sources = volume["projected"]["sources"] if "projected" in volume else [volume]
        for source in sources:
            for kind in ("configMap", "secret"):
                if kind not in source:
                    continue
                spec = source[kind]
                name = spec.get("name") or spec.get("secretName")
                for item in spec.get("items", []):
                    if item["path"] == inside:
                        return kind, name, item["key"]
    return None


# --- schemas -----------------------------------------------------------------------------------


def test_the_manifests_were_found():
    kinds = {d["kind"] for _p, d in DOCS}
    assert {"Namespace", "ConfigMap", "Deployment", "StatefulSet", "Service", "Ingress", "PodDisruptionBudget",
            "NetworkPolicy", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "ScaledObject", "PodMonitor"} <= kinds
    assert set(xiaozhi_deployments()) == set(MODULES)


@pytest.mark.parametrize("item", BUILTIN, ids=doc_id)
@pytest.mark.parametrize("version", ["newest", OLDEST_K8S])
def test_builtin_resources_validate_strictly(item, version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)")
    version = kv.latest_version() if version == "newest" else version
    _path, doc = item
    kv.validate(doc, version, strict=True)


def strict_schema(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever the API server prunes or rejects
    unknown fields: every object schema with ``properties`` and no ``additionalProperties`` or
    ``x-kubernetes-preserve-unknown-fields`` of its own."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validator(doc: dict) -> jsonschema.Draft4Validator:
    path = crd_schema_path(doc)
    assert path.is_file(), f"no vendored CRD schema for {doc['apiVersion']} {doc['kind']} (tests/fixtures/crd-schemas/README.md)"
    # (No check_schema: some patterns are Go RE2, e.g. a mid-pattern `(?i)`, which Python's re
    # refuses as a regex format; they are only compiled when a value is checked against them.)
    return jsonschema.Draft4Validator(strict_schema(json.loads(path.read_text())))


@pytest.mark.parametrize("item", CUSTOM, ids=doc_id)
def test_custom_resources_validate_against_their_crds(item):
    _path, doc = item
    errors = sorted(crd_validator(doc).iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_the_strict_crd_check_rejects_unknown_fields():
    doc = json.loads(json.dumps(find("ScaledObject")[0]))
    doc["spec"]["triggers"][0]["metdata"] = {}
    doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behaviour"] = {}
    paths = {"/".join(map(str, e.absolute_path)) for e in crd_validator(doc).iter_errors(doc)}
    assert paths == {"spec/triggers/0", "spec/advanced/horizontalPodAutoscalerConfig"}, paths


def test_every_custom_resource_kind_has_a_vendored_schema_with_its_source():
    readme = (CRD_SCHEMAS / "README.md").read_text()
    for _path, doc in CUSTOM:
        assert crd_schema_path(doc).name in readme
    for path in CRD_SCHEMAS.glob("*.json"):
        assert path.name in readme, f"{path.name} is not documented in the README"
    assert "Apache-2.0" in readme


# --- kustomize ---------------------------------------------------------------------------------


def kustomization_resources(path: Path) -> list[Path]:
    data = yaml.safe_load(path.read_text())
    assert set(data) <= {"apiVersion", "kind", "resources"}, f"{rel(path)}: only resources, no generators"
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and data["kind"] == "Kustomization"
    return [(path.parent / entry).resolve() for entry in data["resources"]]


def test_kustomizations_list_files_that_exist():
    for path in kustomizations():
        for entry in kustomization_resources(path):
            assert entry.exists(), f"{rel(path)} lists missing {entry}"
            if entry.is_dir():
                assert (entry / "kustomization.yaml").is_file(), f"{rel(path)} lists {entry}, which has no kustomization.yaml"
            else:
                assert entry.suffix == ".yaml"


def test_every_manifest_is_listed_by_a_kustomization():
    listed = {entry for path in kustomizations() for entry in kustomization_resources(path) if entry.is_file()}
    for path in resource_files():
        assert path.resolve() in listed, f"{rel(path)} is in no kustomization.yaml"


def reachable(path: Path) -> set[Path]:
    seen = set()
    for entry in kustomization_resources(path):
        if entry.is_dir():
            seen.add(entry)
            seen |= reachable(entry / "kustomization.yaml")
        else:
            seen.add(entry)
    return seen


def test_the_top_kustomization_deploys_everything_with_keda_not_hpa():
    top = reachable(K8S / "kustomization.yaml")
    unreached = [rel(p) for p in resource_files() if p.resolve() not in top]
    assert all(p.startswith("autoscaling/hpa/") for p in unreached), unreached
    assert (K8S / "autoscaling/keda").resolve() in top and (K8S / "autoscaling/hpa").resolve() not in top
    # Namespace first in the list (kustomize orders it first anyway).
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"][0] == "namespace.yaml"


def test_kubectl_kustomize_builds_every_listed_resource():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (its built-in kustomize builds the kustomizations)")
    for folder, files in ((K8S, reachable(K8S / "kustomization.yaml")), (K8S / "autoscaling/hpa", reachable(K8S / "autoscaling/hpa/kustomization.yaml"))):
        result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        built = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout) if d)
        expected = sorted((d["kind"], d["metadata"]["name"]) for p, d in DOCS if (K8S / p).resolve() in files)
        assert built == expected


def test_the_helm_values_file_is_not_a_resource():
    for name in NOT_RESOURCES:
        data = yaml.safe_load((K8S / name).read_text())
        assert "apiVersion" not in data and "kind" not in data


# --- every resource ----------------------------------------------------------------------------


@pytest.mark.parametrize("item", DOCS, ids=doc_id)
def test_every_resource_is_labelled_and_in_the_namespace(item):
    _path, doc = item
    meta = doc["metadata"]
    labels = meta.get("labels", {})
    for label in LABELS:
        assert labels.get(label), f"missing label {label}"
    assert labels["app.kubernetes.io/part-of"] == "xiaozhi"
    if doc["kind"] == "Namespace":
        assert meta["name"] == NAMESPACE
    else:
        assert meta.get("namespace") == NAMESPACE
    template = doc.get("spec", {}).get("template")
    if template:
        for label in LABELS:
            assert template["metadata"]["labels"][label] == labels[label], label
        # (A Job's selector is made by Kubernetes from its template's labels.)
        for key, value in doc["spec"].get("selector", {}).get("matchLabels", {}).items():
            assert template["metadata"]["labels"][key] == value


# --- workloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", workloads(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_workloads_have_resources_probes_and_run_restricted(workload):
    pod = workload["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True
    assert psc.get("runAsUser", 0) != 0
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"volume {volume['name']}: {kinds}"
    for container in pod["containers"]:
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{container['name']}: {part}"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert probe in container, f"{container['name']}: no {probe}"
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            port = container[probe]["httpGet"]["port"]
            assert port in ports or port in ports.values(), f"{probe} on unknown port {port}"
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False
        assert sc.get("readOnlyRootFilesystem") is True
        assert sc.get("capabilities", {}).get("drop") == ["ALL"]
        assert not sc.get("privileged") and sc.get("runAsUser", psc["runAsUser"]) != 0


def test_every_workload_has_a_disruption_budget_and_is_spread_over_nodes():
    budgets = find("PodDisruptionBudget")
    for workload in workloads():
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]
        if name != "vllm":  # one GPU replica: nothing to keep available through a drain
            matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()]
            assert len(matching) == 1 and matching[0]["spec"]["maxUnavailable"] == 1, name
            spec = pod["spec"]
            spread = spec.get("topologySpreadConstraints", []) + [
                t["podAffinityTerm"] for t in spec.get("affinity", {}).get("podAntiAffinity", {}).get("preferredDuringSchedulingIgnoredDuringExecution", [])
            ]
            assert any(s["topologyKey"] == "kubernetes.io/hostname" for s in spread), name


@pytest.mark.parametrize("service", sorted(MODULES))
def test_each_service_runs_as_its_own_nats_user_with_its_own_secret_key(service):
    deployment = xiaozhi_deployments()[service]
    assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == service
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["run", service]
    assert "command" not in container  # the image's entrypoint: xiaozhi
    env = env_of(container)
    assert all(xz_env_is_valid(name) for name in env if name.startswith("XZ_")), env
    assert env["XZ_NATS__USER"] == service and service in natsauth.SERVICES
    assert mounted_file(pod, container, env["XZ_NATS__PASSWORD_FILE"]) == ("secret", SECRET, f"{service}.password")
    assert mounted_file(pod, container, env["XZ_CONFIG"]) == ("configMap", "xiaozhi-config", "config.yaml")
    # Only its own key of the Secret is in the pod.
    keys = [
        item["key"]
        for volume in pod["volumes"]
        for source in (volume["projected"]["sources"] if "projected" in volume else [volume])
        if "secret" in source
        for item in source["secret"].get("items", [None])
        if item is not None
    ]
    assert keys == [f"{service}.password"]
    assert all("items" in s["secret"] for v in pod["volumes"] for s in (v["projected"]["sources"] if "projected" in v else [v]) if "secret" in s)
    # The metrics port is the service's, and the probes: alive = /metrics, ready = /healthz.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == getattr(Settings(), service).metrics_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["port"] == "metrics"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "models and NATS may take a minute"
    # The image runs as 10001 with a read-only root: writable /tmp and /data.
    assert pod["securityContext"]["runAsUser"] == 10001
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    if service == "manager":
        # Its database and first admin password outlive the pod.
        assert mounts["/data"]["persistentVolumeClaim"]["claimName"] == "manager-data"
    else:
        assert "emptyDir" in mounts["/data"]
    if service != "gateway":
        assert pod["terminationGracePeriodSeconds"] == 30


def test_the_nats_setup_job_runs_as_admin_with_only_the_admins_password():
    job = one("Job", "nats-setup")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["args"][0] == "nats-setup" and "command" not in container
    env = env_of(container)
    assert all(xz_env_is_valid(name) for name in env if name.startswith("XZ_")), env
    assert env["XZ_NATS__USER"] == natsauth.ADMIN
    assert mounted_file(pod, container, env["XZ_NATS__PASSWORD_FILE"]) == ("secret", SECRET, "admin.password")
    assert mounted_file(pod, container, env["XZ_CONFIG"]) == ("configMap", "xiaozhi-config", "config.yaml")
    keys = [item["key"] for volume in pod["volumes"] for source in volume.get("projected", {}).get("sources", []) if "secret" in source for item in source["secret"]["items"]]
    assert keys == ["admin.password"]
    # Restricted like the services; re-run on the next apply once it is gone.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "OnFailure"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    # No service's pod holds the admin's password.
    for name, deployment in xiaozhi_deployments().items():
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert "admin.password" not in json.dumps(volumes), name


def test_the_secret_layout_is_what_xiaozhi_nats_auth_writes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xiaozhi.cli", "nats-auth", "--secrets-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    written = {p.name for p in tmp_path.iterdir()}
    used = set()
    for workload in workloads() + find("Job"):
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            for source in volume["projected"]["sources"] if "projected" in volume else [volume]:
                if "secret" in source:
                    assert source["secret"]["name"] == SECRET
                    used |= {item["key"] for item in source["secret"]["items"]}
    assert used <= written, used - written
    assert used == {"auth.conf"} | {f"{s}.password" for s in natsauth.USERS}
    # No Secret manifest: the passwords are never in git.
    assert not find("Secret")


def test_the_gateway_drains_within_its_grace_period(tmp_path, monkeypatch):
    settings = k8s_settings(tmp_path, monkeypatch)
    deployment = xiaozhi_deployments()["gateway"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    # shared/service.py: the gateway's stop is bounded at stop_timeout_s (drain_s + 5), then NATS drains.
    stop = settings.gateway.drain_s + 5 + settings.nats.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] > settings.gateway.drain_s + settings.nats.drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + stop
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["ws"] == settings.gateway.ws_port and ports["http"] == settings.gateway.http_port


def manager_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, dict]:
    """config.yaml and the manager Deployment's XZ_* values, as the manager loads them."""
    k8s_settings(tmp_path, monkeypatch)
    container = xiaozhi_deployments()["manager"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    for name, entry in env.items():
        if name.startswith("XZ_") and name != "XZ_CONFIG" and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    return load_settings(tmp_path / "config.yaml"), env


def volume_at(pod: dict, container: dict, path: str) -> dict:
    """The volume a file path in a container is on (the deepest mount above it)."""
    target = PurePosixPath(path)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) in target.parents]
    assert mounts, f"{path} is on the read-only root"
    return volumes[max(mounts, key=lambda m: len(m["mountPath"]))["name"]]


def test_the_manager_keeps_one_replica_while_its_database_is_sqlite(tmp_path, monkeypatch):
    from sqlalchemy.engine import make_url

    settings, env = manager_settings(tmp_path, monkeypatch)
    deployment = xiaozhi_deployments()["manager"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # No autoscaler may own it (with SQLite a second replica would be a second writer).
    targets = {d["spec"]["scaleTargetRef"]["name"] for d in find("ScaledObject") + find("HorizontalPodAutoscaler")}
    assert "manager" not in targets
    url_entry = env["XZ_MANAGER__DATABASE_URL"]
    if "valueFrom" in url_entry:
        # A database server, its URL (with the password) from a Secret.
        assert set(url_entry["valueFrom"]) == {"secretKeyRef"}
    else:
        url = make_url(settings.manager.database_url)
        assert settings.manager.database_url == url_entry["value"]
        if url.get_backend_name() == "sqlite":
            assert deployment["spec"]["replicas"] == 1
            assert deployment["spec"]["strategy"] == {"type": "Recreate"}
            # The file is on the PersistentVolumeClaim, not in the pod (an absolute path: four slashes).
            assert PurePosixPath(url.database).is_absolute()
            claim = volume_at(pod, container, url.database)["persistentVolumeClaim"]["claimName"]
            pvc = one("PersistentVolumeClaim", claim)
            assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
            assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    # The first admin password is written where `kubectl exec deploy/manager -- cat` finds it after
    # a restart too.
    out = settings.manager.admin_password_out
    assert PurePosixPath(out).is_absolute() and "persistentVolumeClaim" in volume_at(pod, container, out)
    assert settings.manager.admin_password is None and settings.manager.admin_password_file is None
    assert f"cat {out}" in (K8S / "manager.yaml").read_text()
    # Its ports are the settings' and the Service's.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.manager.port, "metrics": settings.manager.metrics_port}
    (service_port,) = one("Service", "manager")["spec"]["ports"]
    assert service_port["port"] == settings.manager.port and service_port["targetPort"] == "http"
    # Behind the Ingress: the client's address from X-Forwarded-For, for the sign-in limits
    # (the manager believes it only from manager.trusted_proxies; uvicorn's own is off).
    assert "FORWARDED_ALLOW_IPS" not in env
    assert settings.manager.trusted_proxies == ["0.0.0.0/0", "::/0"]


def test_autoscaled_deployments_leave_the_replica_count_to_the_autoscaler():
    for name in AUTOSCALED:
        # A replica count in the Deployment would reset the autoscaler's at every apply.
        assert "replicas" not in xiaozhi_deployments()[name]["spec"], name


# --- config.yaml -------------------------------------------------------------------------------


def unknown_keys(data: Any, model: type = Settings, where: str = "") -> list[str]:
    """Keys of the YAML that are no field of the settings models (Settings ignores them silently)."""
    bad = []
    if not isinstance(data, dict):
        return bad
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            bad.append(f"{where}{key}")
            continue
        models, _is_dict = _models_and_dicts(fields[key].annotation)
        if models and isinstance(value, dict):
            bad += unknown_keys(value, models[0], f"{where}{key}.")
    return bad


def test_config_yaml_is_valid_settings_with_no_unknown_key(tmp_path, monkeypatch):
    data = yaml.safe_load(config_text())
    assert unknown_keys(data) == []
    Settings.model_validate(data)
    settings = k8s_settings(tmp_path, monkeypatch)
    assert settings.log_json is True


def test_config_points_at_the_nats_and_vllm_of_these_manifests(tmp_path, monkeypatch):
    settings = k8s_settings(tmp_path, monkeypatch)
    nats_service = one("Service", "nats")
    client = next(p for p in nats_service["spec"]["ports"] if p["name"] == "client")
    assert settings.nats.url == f"nats://{nats_service['metadata']['name']}:{client['port']}"
    assert settings.work.replicas == one("StatefulSet", "nats")["spec"]["replicas"] == 3
    vllm_service = one("Service", "vllm")
    assert settings.llm.backend == "openai"
    assert settings.llm.base_url == f"http://{vllm_service['metadata']['name']}:{vllm_service['spec']['ports'][0]['port']}/v1"
    args = one("Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == settings.llm.model == "xiaozhi-llm"
    assert args[args.index("--port") + 1] == str(vllm_service["spec"]["ports"][0]["port"])
    assert args[args.index("--model") + 1].startswith("/models/")
    assert "--enable-auto-tool-choice" in args and args[args.index("--tool-call-parser") + 1] == "hermes"
    # Behind the Ingress every device shares the controller's address: no per-address limits.
    assert settings.gateway.rate_limits.connections_per_minute_per_ip == 0
    assert settings.gateway.rate_limits.turns_per_minute_per_ip == 0


def test_the_vllm_pod_gets_a_gpu_its_model_volume_and_shared_memory():
    deployment = one("Deployment", "vllm")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/models"]["persistentVolumeClaim"]["claimName"] == "vllm-models"
    assert one("PersistentVolumeClaim", "vllm-models")
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


# --- the Ingress -------------------------------------------------------------------------------


def gateway_http_routes() -> set[str]:
    from gateway.ota import make_app

    app = make_app(GatewaySettings(), "key")
    return {resource.canonical for resource in app.router.resources()}


def test_the_ingress_routes_devices_to_the_gateway(tmp_path, monkeypatch):
    settings = k8s_settings(tmp_path, monkeypatch)
    ingress = one("Ingress", "xiaozhi")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.rstrip("m")) * 1024 * 1024 > settings.gateway.vision.max_image_bytes
    (rule,) = ingress["spec"]["rules"]
    service = one("Service", "gateway")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    routes = gateway_http_routes()
    by_port: dict[str, list[str]] = {}
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        assert backend["name"] == "gateway" and path["pathType"] == "Prefix"
        assert backend["port"]["name"] in service_ports
        by_port.setdefault(backend["port"]["name"], []).append(path["path"])
    # The WebSocket URL OTA hands out goes through the Ingress to the WebSocket port.
    url = settings.gateway.websocket_url
    assert url.startswith(f"wss://{rule['host']}/")
    ws_path = url.split(rule["host"], 1)[1]
    assert any(ws_path == p or ws_path.startswith(p.rstrip("/") + "/") for p in by_port["ws"])
    assert service_ports["ws"]["port"] == settings.gateway.ws_port and service_ports["http"]["port"] == settings.gateway.http_port
    # Every HTTP route of the gateway (OTA, activation, downloads, vision) is reachable.
    # Not "/" (OTA on the bare host): on this host it is the console's page.
    for route in routes - {"/"}:
        assert any(route == p or route.startswith(p.rstrip("/") + "/") for p in by_port["http"]), route
    assert settings.gateway.public_host == rule["host"]
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]


def manager_http_routes() -> set[str]:
    from manager.app import create_app

    app = create_app(Settings().manager, None, None, None, None)
    return {route.path for route in app.routes}


def test_the_manager_ingress_routes_the_api_and_its_docs_on_the_devices_host(tmp_path, monkeypatch):
    settings = k8s_settings(tmp_path, monkeypatch)
    ingress = one("Ingress", "manager")
    devices = one("Ingress", "xiaozhi")
    annotations = ingress["metadata"]["annotations"]
    # Passwords and tokens: never over plain http when there is a certificate.
    assert annotations["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(body.rstrip("m")) * 1024 * 1024 > settings.manager.max_firmware_bytes
    assert ingress["spec"]["ingressClassName"] == devices["spec"]["ingressClassName"]
    (rule,) = ingress["spec"]["rules"]
    (device_rule,) = devices["spec"]["rules"]
    assert rule["host"] == device_rule["host"] and ingress["spec"]["tls"] == devices["spec"]["tls"]
    service_ports = {p["name"] for p in one("Service", "manager")["spec"]["ports"]}
    routes = manager_http_routes()
    paths = []
    for path in rule["http"]["paths"]:
        backend = path["backend"]["service"]
        assert backend["name"] == "manager" and backend["port"]["name"] in service_ports
        paths.append((path["path"], path["pathType"]))

    def served(route: str) -> bool:
        return any(route == p or (kind == "Prefix" and route.startswith(p.rstrip("/") + "/")) for p, kind in paths)

    # Every route of the API and its docs is reachable, and every path leads to one.
    for route in routes:
        assert served(route), route
    for path, _kind in paths:
        assert any(r == path or r.startswith(path + "/") for r in routes), path
    # No path of the devices' Ingress is taken over (nor a gateway route).
    for path in devices["spec"]["rules"][0]["http"]["paths"]:
        assert not served(path["path"]), path["path"]
    # Except "/" (OTA on the bare host, for a gateway on its own port): here it is the console.
    for route in gateway_http_routes() - {"/"}:
        assert not served(route), route


def test_the_mcp_endpoint_service_matches_the_tools_settings():
    service = one("Service", "tools-mcp")
    (port,) = service["spec"]["ports"]
    assert port["port"] == Settings().tools.mcp_endpoint.port
    container = xiaozhi_deployments()["tools"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "mcp", "containerPort": Settings().tools.mcp_endpoint.port} in container["ports"]


def test_services_select_pods_and_target_named_ports():
    for service in find("Service"):
        selector = service["spec"]["selector"]
        pods = [w for w in workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, service["metadata"]["name"]
        names = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)


# --- autoscaling -------------------------------------------------------------------------------


def documented_metrics() -> set[str]:
    return set(re.findall(r"`(xz_[a-z0-9_]+)", METRICS_DOC.read_text()))


def adapter_values() -> dict:
    return yaml.safe_load((K8S / "autoscaling/hpa/prometheus-adapter-values.yaml").read_text())


def test_keda_scales_every_service_on_metrics_the_services_export():
    objects = {o["metadata"]["name"]: o for o in find("ScaledObject", under="autoscaling/keda/")}
    assert set(objects) == AUTOSCALED
    known = documented_metrics()
    for name, obj in objects.items():
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] == name and name in xiaozhi_deployments()
        # The autoscaler owns the replica count: one in the Deployment would reset it at each apply.
        assert "replicas" not in xiaozhi_deployments()[name]["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
        prometheus = [t for t in spec["triggers"] if t["type"] == "prometheus"]
        assert prometheus, name
        for trigger in prometheus:
            assert trigger["metricType"] == "AverageValue"
            assert trigger["metadata"]["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
            float(trigger["metadata"]["threshold"])
            query = trigger["metadata"]["query"]
            names = metric_names(query)
            assert names and names <= known, (name, names - known)
            assert 'namespace="xiaozhi"' in query
    assert objects["gateway"]["spec"]["minReplicaCount"] >= 2


def test_hpas_cover_every_service_with_adapter_metrics():
    hpas = {h["metadata"]["name"]: h for h in find("HorizontalPodAutoscaler", under="autoscaling/hpa/")}
    assert set(hpas) == AUTOSCALED
    values = adapter_values()
    custom = {r["name"]["as"]: r for r in values["rules"]["custom"]}
    external = {r["name"]["as"]: r for r in values["rules"]["external"]}
    known = documented_metrics()
    for rule in values["rules"]["custom"] + values["rules"]["external"]:
        names = metric_names(rule["seriesQuery"]) | metric_names(rule["metricsQuery"])
        assert names and names <= known, names - known
    for name, hpa in hpas.items():
        spec = hpa["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
        types = {m["type"] for m in spec["metrics"]}
        assert "Resource" in types, name
        for metric in spec["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in custom
            elif metric["type"] == "External":
                assert metric["external"]["metric"]["name"] in external
                assert metric["external"]["metric"]["selector"]["matchLabels"] == {"queue": name}
    assert {m["pods"]["metric"]["name"] for m in hpas["gateway"]["spec"]["metrics"] if m["type"] == "Pods"} == {"xz_gateway_sessions"}
    assert {m["pods"]["metric"]["name"] for m in hpas["vad"]["spec"]["metrics"] if m["type"] == "Pods"} == {"xz_vad_streams"}
    assert "* 0.06" in custom["xz_vad_streams"]["metricsQuery"]
    for stage in workqueue.STAGES:
        assert "External" in {m["type"] for m in hpas[stage]["spec"]["metrics"]}, stage


# --- monitoring --------------------------------------------------------------------------------


def test_the_pod_monitor_scrapes_every_services_metrics_port():
    (monitor,) = find("PodMonitor", "xiaozhi")
    spec = monitor["spec"]
    assert spec["jobLabel"] == "app.kubernetes.io/component"
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    for service, deployment in xiaozhi_deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert labels[spec["jobLabel"]] == service


# --- network policies --------------------------------------------------------------------------


def pod_templates() -> list[dict]:
    return [w["spec"]["template"] for w in workloads()]


def labels_of(component: str) -> dict:
    return next(t for t in pod_templates() if t["metadata"]["labels"]["app.kubernetes.io/component"] == component)


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def admitted(target: dict, port: int, peer_labels: dict | None, peer_namespace: str) -> bool:
    """Would the NetworkPolicies admit a connection to ``target`` (a pod template) on ``port``
    from a pod with ``peer_labels`` (None: not a pod, e.g. a device) in ``peer_namespace``?"""
    labels = target["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for c in target["spec"]["containers"] for p in c.get("ports", [])}
    policies = [p for p in find("NetworkPolicy") if selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"]["policyTypes"]]
    assert policies, "a pod no policy selects is open to everyone"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") in (port, *[n for n, v in named.items() if v == port]) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_ok = "namespaceSelector" not in peer and peer_namespace == NAMESPACE or (
                    "namespaceSelector" in peer and selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer_namespace})
                )
                pod_ok = "podSelector" not in peer or (peer_labels is not None and selects(peer["podSelector"], peer_labels))
                if "ipBlock" in peer:
                    return True
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_admit_what_the_stack_needs_and_no_more():
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in find("NetworkPolicy")), "no default deny"
    gateway, nats, vllm, tools, manager = (labels_of(c) for c in ("gateway", "nats", "vllm", "tools", "manager"))
    device = (None, "ingress-nginx")
    gw = gateway["metadata"]["labels"]
    for port in (8000, 8003):
        assert admitted(gateway, port, *device)
    assert admitted(tools, 8004, *device)
    assert admitted(manager, Settings().manager.port, *device)
    assert not admitted(nats, 4222, *device)
    assert not admitted(vllm, 8000, *device)
    for template in pod_templates():
        labels = template["metadata"]["labels"]
        assert admitted(nats, 4222, labels, NAMESPACE) or labels["app.kubernetes.io/part-of"] != "xiaozhi"
        for port in (p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if p["name"] == "metrics"):
            assert admitted(template, port, None, "monitoring")
            assert not admitted(template, port, *device)
    assert admitted(nats, 6222, nats["metadata"]["labels"], NAMESPACE)
    assert not admitted(nats, 6222, gw, NAMESPACE)
    assert admitted(nats, 8222, None, "monitoring") and not admitted(nats, 8222, gw, NAMESPACE)
    assert admitted(vllm, 8000, labels_of("llm")["metadata"]["labels"], NAMESPACE)
    assert not admitted(vllm, 8000, gw, NAMESPACE)
    assert not admitted(nats, 4222, {"app": "other"}, NAMESPACE)


# --- NATS: the real server with the ConfigMap's nats.conf ----------------------------------------


def nats_conf() -> str:
    return one("ConfigMap", "nats-config")["data"]["nats.conf"]


def test_the_nats_pods_mount_the_config_and_auth_where_include_finds_it():
    sts = one("StatefulSet", "nats")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = container["command"][container["command"].index("--config") + 1]
    assert mounted_file(pod, container, config) == ("configMap", "nats-config", "nats.conf")
    include = re.search(r"^include\s+(\S+)", nats_conf(), re.M).group(1)
    auth = (PurePosixPath(config).parent / include).as_posix().replace("/./", "/")
    assert mounted_file(pod, container, auth) == ("secret", SECRET, "auth.conf")
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert re.search(r"^server_name:\s*\$POD_NAME\s*$", nats_conf(), re.M)
    store = re.search(r'store_dir:\s*"?([^"\s]+)', nats_conf()).group(1)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[store] == sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    pid = re.search(r'pid_file:\s*"?([^"\s]+)', nats_conf()).group(1)
    assert str(PurePosixPath(pid).parent) in mounts
    assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == f"ldm={pid}"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {4222, 6222, 8222}


def test_the_nats_routes_name_every_pod_of_the_statefulset():
    sts = one("StatefulSet", "nats")
    routes = re.findall(r"nats://[\w.-]+:\d+", nats_conf().split("cluster", 1)[1])
    name, service, replicas = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    assert sorted(routes) == [f"nats://{name}-{i}.{service}.{NAMESPACE}.svc.cluster.local:6222" for i in range(replicas)]


def _sub_once(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
    assert count == 1, f"not found in nats.conf: {pattern}"
    return new


def local_nats_conf(text: str, client: int, monitor: int, cluster: int, routes: list[int], store: Path, pid: Path) -> str:
    """The ConfigMap's nats.conf with loopback ports, local routes and a local store instead."""
    text = "host: 127.0.0.1\n" + text
    text = _sub_once(r"^port:\s*4222\s*$", f"port: {client}", text)
    text = _sub_once(r"^http_port:\s*8222\s*$", f"http_port: {monitor}", text)
    text = _sub_once(r"^(\s+)port:\s*6222\s*$", rf"\1listen: 127.0.0.1:{cluster}", text)
    text = _sub_once(r'^(\s*)store_dir:.*$', rf'\1store_dir: "{store}"', text)
    text = _sub_once(r"^pid_file:.*$", f'pid_file: "{pid}"', text)
    pods = iter(routes)
    text, count = re.subn(r"nats://nats-\d+\.nats-headless\.xiaozhi\.svc\.cluster\.local:6222", lambda _m: f"nats://127.0.0.1:{next(pods)}", text)
    assert count == len(routes)
    return text


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory) -> Iterator[dict]:
    """Three nats-servers from the ConfigMap's nats.conf, on loopback, with real generated auth."""
    tmp = tmp_path_factory.mktemp("k8s-nats")
    secrets = tmp / "secrets"
    result = subprocess.run([sys.executable, "-m", "xiaozhi.cli", "nats-auth", "--secrets-dir", str(secrets)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    replicas = one("StatefulSet", "nats")["spec"]["replicas"]
    # The unchanged file first: nats-server's config check, with auth.conf where include looks.
    (tmp / "as-is").mkdir()
    (tmp / "as-is/nats.conf").write_text(nats_conf())
    (tmp / "as-is/secrets").symlink_to(secrets)
    checked = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp / "as-is/nats.conf")], capture_output=True, text=True, timeout=30, env={**os.environ, "POD_NAME": "nats-0"})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    clients = [free_port() for _ in range(replicas)]
    monitors = [free_port() for _ in range(replicas)]
    clusters = [free_port() for _ in range(replicas)]
    procs, logs = [], []
    try:
        for i in range(replicas):
            folder = tmp / f"nats-{i}"
            folder.mkdir()
            (folder / "secrets").symlink_to(secrets)
            conf = folder / "nats.conf"
            conf.write_text(local_nats_conf(nats_conf(), clients[i], monitors[i], clusters[i], clusters, folder / "data", folder / "nats.pid"))
            log = open(folder / "nats.log", "ab")
            logs.append(log)
            env = {**os.environ, "POD_NAME": f"nats-{i}"}
            procs.append(subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        for i in range(replicas):
            assert wait_tcp("127.0.0.1", clients[i], 10), (tmp / f"nats-{i}/nats.log").read_text()
        # Ready as the startup probe sees it: JetStream current on every server (a meta leader).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(http_get(f"http://127.0.0.1:{m}/healthz")[0] == 200 for m in monitors):
            time.sleep(0.25)
        yield {"urls": [f"nats://127.0.0.1:{p}" for p in clients], "monitors": monitors, "secrets": secrets, "tmp": tmp}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def test_the_nats_servers_form_a_cluster_and_answer_the_probes(nats_cluster):
    sts = one("StatefulSet", "nats")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert "/healthz?js-enabled-only=true" in paths
    replicas = sts["spec"]["replicas"]
    for i, monitor in enumerate(nats_cluster["monitors"]):
        for path in paths:
            status, body = http_get(f"http://127.0.0.1:{monitor}{path}")
            assert status == 200, (path, body)
        status, body = http_get(f"http://127.0.0.1:{monitor}/varz")
        varz = json.loads(body)
        assert varz["server_name"] == f"nats-{i}"
        assert varz["cluster"]["name"] == "xiaozhi"
        assert varz["jetstream"]["config"]["max_memory"] == 1024**3  # max_memory_store: 1GB
        routez = json.loads(http_get(f"http://127.0.0.1:{monitor}/routez")[1])
        peers = {r.get("remote_name") for r in routez["routes"]}
        assert peers >= {f"nats-{j}" for j in range(replicas) if j != i}, routez


async def test_each_service_user_connects_and_the_work_queues_get_three_replicas(nats_cluster, tmp_path, monkeypatch):
    settings = k8s_settings(tmp_path, monkeypatch)
    secrets = nats_cluster["secrets"]
    # First the Job nats-setup, as the admin user: it makes the streams with config.yaml's
    # settings (replicas 3); the service users may not.
    job = one("Job", "nats-setup")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    config = tmp_path / "config.yaml"
    config.write_text(one("ConfigMap", "xiaozhi-config")["data"]["config.yaml"])
    run_env = {**os.environ, **env, "XZ_CONFIG": str(config), "XZ_NATS__URL": ",".join(nats_cluster["urls"]), "XZ_NATS__PASSWORD_FILE": str(secrets / Path(env["XZ_NATS__PASSWORD_FILE"]).name)}
    args = [a if a != "300" else "60" for a in container["args"]]
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "xiaozhi.cli", *args], env=run_env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for service in MODULES:
        env = env_of(xiaozhi_deployments()[service]["spec"]["template"]["spec"]["containers"][0])
        password_file = secrets / Path(env["XZ_NATS__PASSWORD_FILE"]).name
        nats_settings = settings.nats.model_copy(update={"user": env["XZ_NATS__USER"], "password_file": str(password_file)})
        nc = NATS()
        await nc.connect(servers=nats_cluster["urls"], user=nats_settings.user, password=nats_settings.secret(), allow_reconnect=False, connect_timeout=5, inbox_prefix=natsauth.inbox_prefix(nats_settings.user))
        try:
            if service == "gateway":
                # What every service does at start (shared/service.py), with config.yaml's work settings.
                deadline = time.monotonic() + 30
                while True:
                    try:
                        for stage in workqueue.STAGES:
                            await workqueue.ensure_stream(nc, Subjects(settings.nats.prefix), stage, settings.work)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
                js = nc.jetstream()
                for stage in workqueue.STAGES:
                    info = await js.stream_info(workqueue.stream_name(settings.nats.prefix, stage))
                    assert info.config.num_replicas == 3
                    assert info.cluster is not None and len(info.cluster.replicas or []) == 2
                ack = await js.publish(f"{settings.nats.prefix}.llm.k8s-test", b"{}")
                assert ack.stream == workqueue.stream_name(settings.nats.prefix, "llm")
            elif service == "manager":
                # Its live-configuration bucket and the firmware store, made as the manager makes
                # them at start: replicated like the work queues (work.replicas 3).
                from manager.live import Publisher

                subjects = Subjects(settings.nats.prefix)
                kv = await open_bucket(nc, subjects.kv_agents, settings.work.replicas)
                assert kv is not None
                await kv.put("k8s-test", b"{}")
                assert (await kv.get("k8s-test")).value == b"{}"
                stream = await nc.jetstream().stream_info(f"KV_{subjects.kv_agents}")
                assert stream.config.num_replicas == 3
                publisher = Publisher(asyncio.get_running_loop(), nc, subjects.kv_agents, None, subjects.kv_devices, subjects.obj_firmware, settings.work.replicas)  # type: ignore[arg-type]
                store = await publisher._object_store()
                await store.put("k8s-test_1.0.bin", b"\x00" * 1000)
                stream = await nc.jetstream().stream_info(f"OBJ_{subjects.obj_firmware}")
                assert stream.config.num_replicas == 3
            else:
                # What every service does at start: the work queues are there (it only looks).
                for stage in workqueue.STAGES:
                    await workqueue.ensure_stream(nc, Subjects(settings.nats.prefix), stage, settings.work)
        finally:
            await nc.close()


async def test_nats_refuses_wrong_and_missing_credentials(nats_cluster):
    url = nats_cluster["urls"][0]
    for kwargs in ({"user": "gateway", "password": "wrong"}, {"user": "nobody", "password": "x"}, {}):
        nc = NATS()
        with pytest.raises(Exception):
            await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **kwargs)
