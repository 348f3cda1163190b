"""Legacy IoT (firmware <= 1.7, protocol.md §5.2 and §5.8) as tools, as a pure core.

Devices describe "things" (descriptors: properties and methods) and report their states. Each
property becomes a tool ``get_<thing>_<prop>`` answered from the last reported state; each method
becomes ``<thing>_<method>``, which sends an ``iot`` command to the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_TYPES = {"number": "number", "boolean": "boolean", "string": "string", "integer": "integer"}


def _list(value: Any) -> list:
    """A list from a device field, or nothing: devices (or impostors) send any JSON."""
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


@dataclass
class IotTool:
    name: str  # iot.<Thing>.<method> or iot.<Thing>.get.<prop>
    llm_name: str
    description: str
    input_schema: dict[str, Any]
    thing: str
    method: str | None = None
    prop: str | None = None


@dataclass
class IotState:
    descriptors: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)

    def update(self, message: dict[str, Any]) -> None:
        """Take an ``iot`` message: descriptors (one thing each) and/or states (full or delta)."""
        for descriptor in _list(message.get("descriptors")):
            if isinstance(descriptor, dict) and isinstance(descriptor.get("name"), str):
                self.descriptors[descriptor["name"]] = descriptor
        for state in _list(message.get("states")):
            if isinstance(state, dict) and isinstance(state.get("name"), str) and isinstance(state.get("state"), dict):
                self.states.setdefault(state["name"], {}).update(state["state"])

    def tools(self) -> list[IotTool]:
        out: list[IotTool] = []
        for thing, descriptor in self.descriptors.items():
            about = str(descriptor.get("description") or thing)
            for prop, spec in _dict(descriptor.get("properties")).items():
                if not isinstance(spec, dict):
                    continue
                out.append(IotTool(
                    name=f"iot.{thing}.get.{prop}",
                    llm_name=f"get_{_slug(thing)}_{_slug(prop)}",
                    description=f"Get {spec.get('description') or prop} of {about}.",
                    input_schema={"type": "object", "properties": {}},
                    thing=thing,
                    prop=prop,
                ))
            for method, spec in _dict(descriptor.get("methods")).items():
                if not isinstance(spec, dict):
                    continue
                params = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else {}
                properties = {
                    name: {"type": _TYPES.get(str(p.get("type")), "string"), "description": str(p.get("description") or name)}
                    for name, p in params.items()
                    if isinstance(p, dict)
                }
                out.append(IotTool(
                    name=f"iot.{thing}.{method}",
                    llm_name=f"{_slug(thing)}_{_slug(method)}",
                    description=f"{spec.get('description') or method} ({about}).",
                    input_schema={"type": "object", "properties": properties, "required": list(properties)},
                    thing=thing,
                    method=method,
                ))
        return out

    def find(self, name: str) -> IotTool | None:
        return next((t for t in self.tools() if name in (t.name, t.llm_name)), None)

    def read(self, tool: IotTool) -> tuple[bool, str]:
        value = self.states.get(tool.thing, {}).get(tool.prop or "")
        if value is None:
            return False, f"{tool.thing} has not reported {tool.prop} yet"
        return True, f"{tool.prop} of {tool.thing} is {value}"


def command(tool: IotTool, arguments: dict[str, Any]) -> dict[str, Any]:
    """The ``iot`` message that runs a method on the device."""
    return {"type": "iot", "commands": [{"name": tool.thing, "method": tool.method, "parameters": arguments}]}
