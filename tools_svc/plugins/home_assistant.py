"""``hass_get_state`` / ``hass_set_state``: Home Assistant devices through its REST API."""

from __future__ import annotations

from typing import Any

import aiohttp

from shared.messages import ToolCall, ToolResult, ToolSpec

KEYWORDS = ["light", "lights", "lamp", "switch", "fan", "heater", "plug", "turn", "灯", "开关", "打开", "关闭"]

GET_SPEC = ToolSpec(
    name="hass_get_state",
    description="Get the state of a smart home device (light, switch...).",
    parameters={"type": "object", "properties": {"device": {"type": "string"}}, "required": ["device"]},
    keywords=KEYWORDS,
)
SET_SPEC = ToolSpec(
    name="hass_set_state",
    description="Turn a smart home device (light, switch...) on or off.",
    parameters={
        "type": "object",
        "properties": {"device": {"type": "string"}, "state": {"type": "string", "enum": ["on", "off", "toggle"]}},
        "required": ["device", "state"],
    },
    keywords=KEYWORDS,
)


def specs(context: dict[str, Any]) -> list[ToolSpec]:
    """Offered only when Home Assistant is configured; device names become an enum."""
    settings = context["settings"].home_assistant
    if not settings.base_url or not settings.entities:
        return []
    names = sorted(settings.entities)
    out = []
    for spec in (GET_SPEC, SET_SPEC):
        params = {**spec.parameters, "properties": {**spec.parameters["properties"], "device": {"type": "string", "enum": names}}}
        out.append(spec.model_copy(update={"parameters": params}))
    return out


def _entity(context: dict[str, Any], name: str) -> str | None:
    entities = context["settings"].home_assistant.entities
    name = name.strip().lower()
    for spoken, entity_id in entities.items():
        if name in (spoken.lower(), entity_id.lower()):
            return entity_id
    return None


async def _request(context: dict[str, Any], method: str, path: str, body: dict | None = None) -> Any:
    settings = context["settings"].home_assistant
    http: aiohttp.ClientSession = context["http"]
    headers = {"Authorization": f"Bearer {settings.token}", "Content-Type": "application/json"}
    async with http.request(method, settings.base_url.rstrip("/") + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=settings.timeout_s)) as response:
        if response.status == 401:
            raise PermissionError("Home Assistant refused the token")
        response.raise_for_status()
        return await response.json(content_type=None)


async def get_state(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    name = str(request.arguments.get("device", ""))
    entity_id = _entity(context, name)
    if entity_id is None:
        return ToolResult(name=GET_SPEC.name, ok=False, action="error", text=f"no device called '{name}'")
    state = await _request(context, "GET", f"/api/states/{entity_id}")
    return ToolResult(name=GET_SPEC.name, action="response", text=f"The {name} is {state.get('state', 'unknown')}.")


async def set_state(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    name = str(request.arguments.get("device", ""))
    wanted = str(request.arguments.get("state", ""))
    entity_id = _entity(context, name)
    if entity_id is None:
        return ToolResult(name=SET_SPEC.name, ok=False, action="error", text=f"no device called '{name}'")
    domain = entity_id.split(".", 1)[0]
    service = {"on": "turn_on", "off": "turn_off", "toggle": "toggle"}[wanted]
    await _request(context, "POST", f"/api/services/{domain}/{service}", {"entity_id": entity_id})
    spoken = {"on": "on", "off": "off", "toggle": "toggled"}[wanted]
    return ToolResult(name=SET_SPEC.name, action="response", text=f"Okay, the {name} is {spoken}." if wanted != "toggle" else f"Okay, I toggled the {name}.")
