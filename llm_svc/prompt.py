"""The system prompt: the agent's role, the time, the language, emotions and what is remembered."""

from __future__ import annotations

import datetime as dt

from shared.agents import AgentConfig
from shared.calendar import lunar_date
from shared.phrases import ZH_WEEKDAYS
from shared.settings import LlmSettings

DEFAULT_ROLE = LlmSettings.model_fields["system_prompt"].default

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
    language = language if agent.language in (None, "auto") else agent.language
    if language == "zh":
        return _chinese_prompt(default_role, agent, now, summary, emoji)
    role = (agent.role_prompt or default_role).replace("{name}", agent.name)
    lines = [role]
    when = f"It is now {now:%H:%M} on {now:%A}, {now:%B} {now.day}, {now.year}."
    lines.append(when)
    if language and language in LANGUAGES:
        lines.append(f"Always answer in {LANGUAGES[language]}.")
    if emoji:
        lines.append(f"You may start a reply with one emoji that shows your mood: {EMOJIS}.")
    if summary:
        lines.append(f"What you remember about the user from earlier conversations: {summary}")
    return "\n".join(lines)


# The default role in Mandarin, for agents whose language is zh and who have no role of their own.
ZH_ROLE = "你是{name}，一个友好的语音助手。用一到三句简短的口语回答，不要用列表、Markdown 或表情符号。"


def _chinese_prompt(default_role: str, agent: AgentConfig, now: dt.datetime, summary: str, emoji: bool) -> str:
    """The whole prompt in Chinese: a small model answers in the language it is spoken to in."""
    role = agent.role_prompt or (ZH_ROLE if default_role == DEFAULT_ROLE else default_role)
    lines = [role.replace("{name}", "小智" if agent.name == "Xiaozhi" else agent.name)]
    when = f"现在是{now.year}年{now.month}月{now.day}日，星期{ZH_WEEKDAYS[now.weekday()]}，{now:%H:%M}。"
    lunar = lunar_date(now.date())
    if lunar:
        when = when[:-1] + f"（{lunar}）。"
    lines.append(when)
    lines.append("请始终用简体中文（普通话）回答。")
    if emoji:
        lines.append(f"回答可以用一个表示心情的表情开头：{EMOJIS}。")
    if summary:
        lines.append(f"你记得的关于用户的事：{summary}")
    return "\n".join(lines)
