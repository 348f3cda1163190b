"""Write the Grafana dashboard and the Kubernetes monitoring resources from one source.

    python scripts/render_observability.py          # (re)write the files
    python scripts/render_observability.py --check  # exit 1 if any file is out of date

Writes:
- ``deploy/observability/grafana/xiaozhi.json``: the dashboard (compose provisions it; import
  it into any Grafana with a Prometheus data source);
- ``deploy/k8s/monitoring/grafana-dashboard.yaml``: the same dashboard as a ConfigMap labelled
  ``grafana_dashboard: "1"`` (the Grafana sidecar of kube-prometheus-stack loads it);
- ``deploy/k8s/monitoring/prometheusrule.yaml``: ``deploy/observability/alerts.yml`` as a
  Prometheus Operator PrometheusRule.

The panels are defined below, in rows. Queries use Grafana's ``$__rate_interval``; the tests
(tests/deploy/test_observability.py) run every query of the main rows against a real Prometheus
scraping the running services, and check every metric name against their ``/metrics``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/observability/grafana/xiaozhi.json"
ALERTS = ROOT / "deploy/observability/alerts.yml"
K8S_DASHBOARD = ROOT / "deploy/k8s/monitoring/grafana-dashboard.yaml"
K8S_RULES = ROOT / "deploy/k8s/monitoring/prometheusrule.yaml"
NAMESPACE = "xiaozhi"
LABELS = {"app.kubernetes.io/name": "xiaozhi", "app.kubernetes.io/component": "monitoring", "app.kubernetes.io/part-of": "xiaozhi"}

R = "$__rate_interval"


def q95(metric: str, by: str = "", q: float = 0.95) -> str:
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) (rate({metric}_bucket[{R}])))"


# (row title, [panel]); a panel: (title, kind, unit, [(expr, legend)], description).
# Rows named in MAIN_ROWS must show data after one spoken turn; the "Errors" row shows counters
# that stay empty on a healthy stack.
ROWS: list[tuple[str, list[tuple[str, str, str, list[tuple[str, str]], str]]]] = [
    (
        "Overview",
        [
            ("Sessions", "stat", "short", [("sum(xz_gateway_sessions)", "sessions")], "Open device WebSocket sessions, all gateways."),
            ("Streaming devices", "stat", "short", [("sum(rate(xz_vad_frames_total[1m])) * 0.06", "streams")], "Devices sending audio now: uplink frames per second times 60 ms."),
            ("Turns in flight", "stat", "short", [("sum(xz_gateway_turns_in_flight)", "turns")], "Sessions with a reply under way."),
            ("Turns / min", "stat", "short", [("sum(rate(xz_llm_turns_total[5m])) * 60", "turns/min")], "Turns answered by the LLM stage, per minute (5-minute average)."),
            ("Voice to voice p95", "stat", "s", [("histogram_quantile(0.95, sum by (le) (rate(xz_gateway_voice_to_voice_seconds_bucket[5m])))", "p95")], "End of the user's speech to the first reply frame sent, 95th percentile over 5 minutes."),
            ("Fallback replies (5m)", "stat", "short", [("sum(increase(xz_gateway_fallback_replies_total[5m])) or vector(0)", "fallbacks")], "Fixed phrases spoken instead of an answer (busy, timeouts, lost VAD)."),
        ],
    ),
    (
        "Latency",
        [
            (
                "Voice to voice",
                "timeseries",
                "s",
                [(q95("xz_gateway_voice_to_voice_seconds", q=0.5), "p50"), (q95("xz_gateway_voice_to_voice_seconds"), "p95"), (q95("xz_gateway_voice_to_voice_seconds", q=0.99), "p99")],
                "End of user speech (the VAD's decision minus its silence wait) to the first reply frame sent to the device.",
            ),
            (
                "Stage latency p95",
                "timeseries",
                "s",
                [
                    (q95("xz_vad_end_of_turn_delay_seconds"), "VAD end-of-turn wait"),
                    (q95("xz_asr_seconds"), "ASR transcription"),
                    (q95("xz_llm_first_token_seconds"), "LLM first token"),
                    (q95("xz_llm_first_sentence_seconds"), "LLM first sentence"),
                    (q95("xz_tts_first_frame_seconds"), "TTS first frame"),
                ],
                "Where a turn's time goes, stage by stage.",
            ),
            (
                "Real-time factors p50",
                "timeseries",
                "short",
                [(q95("xz_asr_real_time_factor", q=0.5), "ASR"), (q95("xz_tts_real_time_factor", q=0.5), "TTS")],
                "Processing time divided by audio length: under 1 is faster than real time.",
            ),
            (
                "VAD frame lag",
                "timeseries",
                "s",
                [(q95("xz_vad_frame_lag_seconds", q=0.5), "p50"), (q95("xz_vad_frame_lag_seconds"), "p95"), (q95("xz_vad_frame_lag_seconds", q=0.99), "p99")],
                "The gateway receiving an uplink frame to the VAD having scored it. Grows when VAD workers saturate.",
            ),
            ("Tool calls p95", "timeseries", "s", [(q95("xz_tools_call_seconds", by="tool"), "{{tool}}")], "One tool call, by tool."),
            ("Text turn to first audio p95", "timeseries", "s", [(q95("xz_gateway_text_turn_first_audio_seconds"), "p95")], "Typed text (listen detect) to the first reply frame."),
        ],
    ),
    (
        "Throughput",
        [
            ("Turns by outcome", "timeseries", "ops", [(f"sum by (outcome) (rate(xz_llm_turns_total[{R}]))", "{{outcome}}")], "LLM turns per second: ok, tool, cancelled, empty, error..."),
            (
                "Audio frames",
                "timeseries",
                "ops",
                [(f"sum(rate(xz_gateway_audio_frames_in_total[{R}]))", "uplink (devices to VAD)"), (f"sum(rate(xz_gateway_audio_frames_out_total[{R}]))", "downlink (to devices)")],
                "Opus frames per second through the gateways.",
            ),
            ("Utterances by end", "timeseries", "ops", [(f"sum by (reason) (rate(xz_vad_utterances_total[{R}]))", "{{reason}}")], "How the VAD cut utterances: silence, max_length, listen_stop, too_short."),
            ("Sentences synthesised", "timeseries", "ops", [(f"sum by (outcome) (rate(xz_tts_sentences_total[{R}]))", "{{outcome}}")], "TTS sentences per second; cached phrases come from the clip cache."),
        ],
    ),
    (
        "Saturation",
        [
            ("Work queue depth", "timeseries", "short", [('max by (queue) (xz_queue_depth{queue=~"asr|llm|tts"})', "{{queue}}")], "Items waiting in each stage's JetStream work queue (shared by its workers). Steadily above zero: scale the stage."),
            (
                "Work in progress",
                "timeseries",
                "short",
                [("sum(xz_asr_in_flight)", "ASR"), ("sum(xz_llm_in_flight)", "LLM"), ("sum(xz_tts_in_flight)", "TTS"), ("sum(xz_tools_in_flight)", "tools")],
                "Items being worked on now, all replicas.",
            ),
            ("Sessions per gateway", "timeseries", "short", [("sum by (instance) (xz_gateway_sessions)", "{{instance}}")], "gateway.max_sessions (default 5000) is the hard limit per process."),
            ("Streams per VAD worker", "timeseries", "short", [(f"sum by (instance) (rate(xz_vad_frames_total[{R}])) * 0.06", "{{instance}}")], "About 200 streams per VAD process keep the lag in single milliseconds (docs/benchmarks.md)."),
            ("Processes connected to NATS", "timeseries", "short", [("count by (service) (xz_nats_connected == 1)", "{{service}}")], "Replicas of each stage that are up and connected."),
            ("In-process queues", "timeseries", "short", [('max by (service, queue) (xz_queue_depth{queue!~"asr|llm|tts"})', "{{service}} {{queue}}")], "Subscription backlogs, the local model's waiting turns, the gateways' uplink and downlink queues."),
        ],
    ),
    (
        "Errors",
        [
            ("Fallback replies by reason", "timeseries", "ops", [(f"sum by (reason) (rate(xz_gateway_fallback_replies_total[{R}]))", "{{reason}}")], "busy, unavailable, stt_timeout, turn_timeout, vad_lost, rate_limited."),
            ("Errors handled", "timeseries", "ops", [(f"sum by (service, kind) (rate(xz_errors_total[{R}]))", "{{service}} {{kind}}")], "Errors handled without crashing, by service and kind."),
            ("Input dropped", "timeseries", "ops", [(f"sum by (service, reason) (rate(xz_dropped_total[{R}]))", "{{service}} {{reason}}")], "Bad JSON, bad frames, stale turns, rate-limited audio: dropped on purpose and counted."),
            (
                "Work redelivered and refused",
                "timeseries",
                "ops",
                [(f"sum by (service) (rate(xz_work_redelivered_total[{R}]))", "redelivered {{service}}"), (f"sum by (stage) (rate(xz_work_refused_total[{R}]))", "refused {{stage}}")],
                "Redelivered: a worker died or stalled holding it. Refused: a full queue (the device heard the busy phrase).",
            ),
            (
                "Connections refused",
                "timeseries",
                "ops",
                [(f"sum by (reason) (rate(xz_gateway_connections_rejected_total[{R}]))", "{{reason}}"), (f"sum by (reason) (rate(xz_gateway_auth_failures_total[{R}]))", "auth {{reason}}")],
                "Handshakes refused: full, draining, rate_limited, bad tokens.",
            ),
            ("NATS slow consumers", "timeseries", "ops", [(f"sum by (service) (rate(xz_nats_slow_consumers_total[{R}]))", "{{service}}")], "NATS dropped messages for a subscription that fell behind."),
        ],
    ),
    (
        "Resources",
        [
            ("Memory (RSS)", "timeseries", "bytes", [("sum by (job) (process_resident_memory_bytes)", "{{job}}")], "Resident memory of each service, all replicas."),
            ("CPU", "timeseries", "percentunit", [(f"sum by (job) (rate(process_cpu_seconds_total[{R}]))", "{{job}}")], "CPU cores used by each service, all replicas."),
        ],
    ),
]
MAIN_ROWS = ("Overview", "Latency", "Throughput", "Saturation", "Resources")


def dashboard() -> dict:
    panels: list[dict] = []
    pid = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        x = 0
        for title, kind, unit, targets, description in row_panels:
            width, height = (4, 4) if kind == "stat" else (8, 8)
            if x + width > 24:
                x = 0
                y += height
            panel: dict = {
                "id": pid,
                "type": kind,
                "title": title,
                "description": description,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": height, "w": width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + i), "datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
            if kind == "stat":
                panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value", "graphMode": "area"}
            else:
                panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
            panels.append(panel)
            pid += 1
            x += width
        y += height
    return {
        "uid": "xiaozhi-pipeline",
        "title": "Xiaozhi pipeline",
        "description": "Sessions, voice-to-voice latency, per-stage latency, work queues, errors and resources of the xiaozhi NATS pipeline.",
        "tags": ["xiaozhi"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, the dashboard JSON) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=200, allow_unicode=True) for doc in docs)


def renders() -> dict[Path, str]:
    board = json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"
    rules = yaml.safe_load(ALERTS.read_text())
    header = "# Generated by scripts/render_observability.py from {src}; edit that and re-run.\n"
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "xiaozhi-grafana-dashboard", "namespace": NAMESPACE, "labels": {**LABELS, "grafana_dashboard": "1"}},
        "data": {"xiaozhi.json": board},
    }
    prometheus_rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "xiaozhi", "namespace": NAMESPACE, "labels": {**LABELS, "release": "kube-prometheus-stack"}},
        "spec": {"groups": rules["groups"]},
    }
    return {
        DASHBOARD: board,
        K8S_DASHBOARD: header.format(src="the panels in the script") + dump_yaml([config_map]),
        K8S_RULES: header.format(src="deploy/observability/alerts.yml") + dump_yaml([prometheus_rule]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in renders().items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("out of date (run python scripts/render_observability.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
