"""Checking tool-call arguments against a tool's JSON schema (the subset tools use)."""

from __future__ import annotations

from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def validate(arguments: Any, schema: dict[str, Any]) -> list[str]:
    """Problems with ``arguments``; an empty list means they are valid."""
    if not isinstance(arguments, dict):
        return ["arguments must be a JSON object"]
    problems: list[str] = []
    properties: dict[str, Any] = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in arguments:
            problems.append(f"missing required argument '{name}'")
    for name, value in arguments.items():
        spec = properties.get(name)
        if spec is None:
            if schema.get("additionalProperties") is False:
                problems.append(f"unknown argument '{name}'")
            continue
        expected = spec.get("type")
        if expected in _TYPES:
            ok = isinstance(value, _TYPES[expected]) and not (expected in ("integer", "number") and isinstance(value, bool))
            if not ok:
                problems.append(f"argument '{name}' must be {expected}")
                continue
        if "enum" in spec and value not in spec["enum"]:
            problems.append(f"argument '{name}' must be one of {spec['enum']}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in spec and value < spec["minimum"]:
                problems.append(f"argument '{name}' must be >= {spec['minimum']}")
            if "maximum" in spec and value > spec["maximum"]:
                problems.append(f"argument '{name}' must be <= {spec['maximum']}")
    return problems
