"""The system prompt: the agent's role, the time, the language, emotions and what is remembered."""

from __future__ import annotations

import datetime as dt

from shared.agents import AgentConfig

LANGUAGES = {"en": "English", "zh": "Chinese (Mandarin)", "de": "German", "fr": "French", "es": "Spanish", "ja": "Japanese", "ko": "Korean"}
# Emojis whose emotion the device shows (protocol.md §5.3): the first one in a reply sets it.
EMOJIS = "😊 😆 😢 😮 🤔 😠 😍 😴 😎 😳"


def lunar_date(day: dt.date) -> str | None:
    """The Chinese lunar date, e.g. '农历十月初五', when the lunardate package is installed."""
    try:
        from lunardate import LunarDate
    except ImportError:
        return None
    try:
        lunar = LunarDate.fromSolarDate(day.year, day.month, day.day)
    except ValueError:
        return None
    months = "正二三四五六七八九十冬腊"
    days = ["初一", "初二", "初三", "初四", "初五", "初六", "初七", "初八", "初九", "初十",
            "十一", "十二", "十三", "十四", "十五", "十六", "十七", "十八", "十九", "二十",
            "廿一", "廿二", "廿三", "廿四", "廿五", "廿六", "廿七", "廿八", "廿九", "三十"]
    leap = "闰" if lunar.isLeapMonth else ""
    return f"农历{leap}{months[lunar.month - 1]}月{days[lunar.day - 1]}"


def system_prompt(
    default_role: str,
    agent: AgentConfig,
    now: dt.datetime,
    language: str | None = None,
    summary: str = "",
    emoji: bool = True,
) -> str:
    role = (agent.role_prompt or default_role).replace("{name}", agent.name)
    lines = [role]
    when = f"It is now {now:%H:%M} on {now:%A}, {now:%B} {now.day}, {now.year}."
    language = agent.language or language
    if language == "zh":
        lunar = lunar_date(now.date())
        if lunar:
            when += f" ({lunar})"
    lines.append(when)
    if language and language in LANGUAGES:
        lines.append(f"Always answer in {LANGUAGES[language]}.")
    if emoji:
        lines.append(f"You may start a reply with one emoji that shows your mood: {EMOJIS}.")
    if summary:
        lines.append(f"What you remember about the user from earlier conversations: {summary}")
    return "\n".join(lines)
