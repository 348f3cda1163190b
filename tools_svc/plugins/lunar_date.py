"""``get_lunar_date``: today's date in the Chinese lunar calendar."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from shared.calendar import lunar_date
from shared.messages import ToolCall, ToolResult, ToolSpec

SPEC = ToolSpec(
    name="get_lunar_date",
    description="Get today's date in the Chinese lunar calendar (农历).",
    parameters={"type": "object", "properties": {}, "required": []},
    keywords=["lunar", "农历", "阴历", "chinese calendar"],
)


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    tz_name = context["settings"].timezone
    today = (dt.datetime.now(ZoneInfo(tz_name)) if tz_name else dt.datetime.now().astimezone()).date()
    lunar = lunar_date(today)
    if lunar is None:
        return ToolResult(name=SPEC.name, ok=False, action="error", text="the lunar calendar is not available")
    return ToolResult(name=SPEC.name, action="response", text=f"今天是{lunar}。")
