"""Metric names in PromQL expressions, and metric names in Prometheus text output.

Enough of PromQL for the checks in this folder: every metric name our dashboard, alerts and
autoscalers use must be one the running services export. Not a parser: it strips what cannot
be a metric name (strings, label matchers, ranges, grouping clauses, templating, numbers and
durations, function calls, keywords) and takes the identifiers that are left.
"""

from __future__ import annotations

import re

_TEMPLATES = re.compile(r"<<[^>]*>>")  # prometheus-adapter's <<.Series>>, <<.LabelMatchers>>
_GRAFANA_VARS = re.compile(r"\$\{[^}]*\}|\$\w+")
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2", "start", "end",
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects."""
    text = _TEMPLATES.sub(" x ", expr)
    text = _STRINGS.sub(" ", text)
    text = _GRAFANA_VARS.sub("1m", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(name)
    names.discard("x")  # a stripped adapter template
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can produce, from its samples and TYPE lines.

    A labelled counter that has not counted yet has a TYPE line and no sample; its name still
    exists (queries on it return data once it counts), so TYPE lines count too.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) < 4:
                continue
            name, kind = parts[2], parts[3]
            names.add(name)
            if kind == "counter":
                base = name.removesuffix("_total")
                names.update({base + "_total", base + "_created"})
            elif kind in ("histogram", "summary"):
                names.update({name + "_bucket", name + "_sum", name + "_count", name + "_created"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
