"""Calendar helpers shared by the LLM prompt and the date tools."""

from __future__ import annotations

import datetime as dt


def lunar_date(day: dt.date) -> str | None:
    """The Chinese lunar date, e.g. '农历十月初五', when the lunardate package is installed."""
    try:
        from lunardate import LunarDate
    except ImportError:
        return None
    try:
        lunar = LunarDate.from_solar_date(day.year, day.month, day.day) if hasattr(LunarDate, "from_solar_date") else LunarDate.fromSolarDate(day.year, day.month, day.day)
    except ValueError:
        return None
    months = "正二三四五六七八九十冬腊"
    days = ["初一", "初二", "初三", "初四", "初五", "初六", "初七", "初八", "初九", "初十",
            "十一", "十二", "十三", "十四", "十五", "十六", "十七", "十八", "十九", "二十",
            "廿一", "廿二", "廿三", "廿四", "廿五", "廿六", "廿七", "廿八", "廿九", "三十"]
    leap = "闰" if lunar.isLeapMonth else ""
    return f"农历{leap}{months[lunar.month - 1]}月{days[lunar.day - 1]}"
