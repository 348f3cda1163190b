"""``change_role``: switch this device's persona (role prompt and voice) to one of the configured roles."""

from __future__ import annotations

from typing import Any

from shared.agents import AgentConfig, load_agent, reserved_device_id, save_agent
from shared.phrases import tool_phrase
from shared.messages import ToolCall, ToolResult, ToolSpec

SPEC = ToolSpec(
    name="change_role",
    description="Change your role or persona. Available roles are listed in the role parameter.",
    parameters={"type": "object", "properties": {"role": {"type": "string", "description": "The new role"}}, "required": ["role"]},
    keywords=["role", "persona", "character", "pretend", "角色", "扮演"],
)


def spec(context: dict[str, Any]) -> ToolSpec:
    """The schema with the configured role names as an enum."""
    roles = sorted(context["settings"].roles)
    params = {"type": "object", "properties": {"role": {"type": "string", "enum": roles}}, "required": ["role"]}
    return SPEC.model_copy(update={"parameters": params, "keywords": SPEC.keywords + roles})


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    roles = context["settings"].roles
    wanted = str(request.arguments.get("role", "")).strip().lower()
    if wanted not in roles:
        return ToolResult(name=SPEC.name, ok=False, action="error", text=f"unknown role '{wanted}'; roles: {', '.join(sorted(roles))}")
    kv = context.get("agents_kv")
    if kv is None or reserved_device_id(request.device_id):
        return ToolResult(name=SPEC.name, ok=False, action="error", text="roles cannot be changed here (no agent store or device)")
    agent: AgentConfig = await load_agent(kv, request.device_id)
    role = roles[wanted]
    agent = agent.model_copy(update={"role_prompt": role.role_prompt, "voice": role.voice or agent.voice})
    await save_agent(kv, request.device_id, agent)
    return ToolResult(name=SPEC.name, action="response", text=tool_phrase("role_changed", request.language, role=wanted))
