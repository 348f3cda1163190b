"""The built-in tools answer in the agent's language, never with the English template."""

from __future__ import annotations

import re

from shared.messages import ToolCall
from shared.phrases import LANGUAGES, TOOL_PHRASES
from tools_svc.plugins import handle_exit_intent, weather

FORECAST = {
    "current": {"temperature_2m": -2.4, "weather_code": 71},
    "daily": {"temperature_2m_min": [-5, 1, 3], "temperature_2m_max": [2, 8, 9], "weather_code": [3, 61, 0]},
}


def test_weather_in_mandarin():
    assert weather.describe("北京", FORECAST, "now", "zh") == "北京现在小雪，气温零下2度。"
    assert weather.describe("北京", FORECAST, "tomorrow", "zh") == "北京明天小雨，1度到8度。"
    assert weather.describe("Berlin", FORECAST, "today", "en") == "Today in Berlin: overcast, from -5 to 2 degrees."


async def test_a_chinese_agent_says_goodbye_in_chinese_even_when_the_model_wrote_english():
    english = await handle_exit_intent.call(ToolCall(name="handle_exit_intent", arguments={"say_goodbye": "Bye bye!"}, language="zh"), {})
    assert english.text == TOOL_PHRASES["zh"]["goodbye"] and english.close_after
    own = await handle_exit_intent.call(ToolCall(name="handle_exit_intent", arguments={"say_goodbye": "拜拜，明天见！"}, language="zh"), {})
    assert own.text == "拜拜，明天见！"
    plain = await handle_exit_intent.call(ToolCall(name="handle_exit_intent", arguments={}), {})
    assert plain.text == TOOL_PHRASES["en"]["goodbye"]


def test_every_language_has_every_tool_phrase():
    keys = set(TOOL_PHRASES["en"])
    for code in LANGUAGES:
        assert set(TOOL_PHRASES[code]) == keys, code
        for key in keys:
            # Same placeholders as the English one.
            assert re.findall(r"{\w+}", TOOL_PHRASES[code][key]) == re.findall(r"{\w+}", TOOL_PHRASES["en"][key]), (code, key)
