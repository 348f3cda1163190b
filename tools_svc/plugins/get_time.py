"""``get_time``: the current time, date and weekday, spoken directly."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from shared.messages import ToolCall, ToolResult, ToolSpec
from shared.phrases import say_time

SPEC = ToolSpec(
    name="get_time",
    description="Get the current local time, date and day of the week.",
    parameters={"type": "object", "properties": {}, "required": []},
    keywords=["time", "clock", "date", "day", "today", "weekday", "hour", "o'clock", "几点", "点了", "时间", "日期", "星期", "礼拜", "几号", "今天"],
)


def describe(now: dt.datetime, language: str | None = None) -> str:
    """A sentence a person would say in ``language``, e.g. 'It is 4:05 PM on Tuesday, November
    24, 2026.' or '现在是2026年11月24日，星期二，下午4点零5分。'"""
    return say_time(now, language)


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    tz_name = context["settings"].timezone
    now = dt.datetime.now(ZoneInfo(tz_name)) if tz_name else dt.datetime.now().astimezone()
    return ToolResult(name=SPEC.name, action="response", text=describe(now, request.language))
