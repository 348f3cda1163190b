"""The system prompt: the agent's role, the time, the language, emotions and what is remembered."""

from __future__ import annotations

import datetime as dt

from shared.agents import AgentConfig
from shared.calendar import lunar_date

LANGUAGES = {"en": "English", "zh": "Chinese (Mandarin)", "de": "German", "fr": "French", "es": "Spanish", "ja": "Japanese", "ko": "Korean"}
# Emojis whose emotion the device shows (protocol.md §5.3): the first one in a reply sets it.
EMOJIS = "😊 😆 😢 😮 🤔 😠 😍 😴 😎 😳"


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
