"""llm_svc.tools.relevant_tools: offering a tool only when the turn mentions it."""

from __future__ import annotations

import pytest

from llm_svc.tools import name_keywords, relevant_tools
from shared.messages import ToolSpec


def tool(name: str, *keywords: str) -> ToolSpec:
    return ToolSpec(name=name, description=name, keywords=list(keywords))


TIME = tool("get_time", "time", "clock", "date")
WEATHER = tool("get_weather", "weather", "rain", "天气", "下雨")
VOLUME = tool("set_volume", "volume", "louder", "音量")
TOOLS = [TIME, WEATHER, VOLUME]


def names(text: str, tools: list[ToolSpec] = TOOLS) -> list[str]:
    return [t.name for t in relevant_tools(text, tools)]


def test_keyword_selects_its_tool() -> None:
    assert names("What time is it?") == ["get_time"]


def test_plain_chat_gets_no_tools() -> None:
    assert names("Tell me a joke") == []


def test_case_insensitive() -> None:
    assert names("WHAT'S THE WEATHER LIKE") == ["get_weather"]
    assert names("set an ALARM", [tool("Upper", "Alarm")]) == ["Upper"]
    assert names("nothing here", [tool("Upper", "Alarm")]) == []


@pytest.mark.parametrize("text", ["It is sometimes hard", "timeless music", "the raining season", "undated", "dates"])
def test_english_keywords_match_whole_words_only(text: str) -> None:
    assert names(text) == []


@pytest.mark.parametrize("text, tool_name", [("time?", "get_time"), ("(time)", "get_time"), ("time,please", "get_time"), ("the clock.", "get_time"), ("rain!", "get_weather")])
def test_english_keywords_next_to_punctuation(text: str, tool_name: str) -> None:
    assert names(text) == [tool_name]


def test_apostrophe_is_part_of_a_word() -> None:
    # "time's" is one word, so it does not mention "time" as a whole word
    assert names("time's up") == []


def test_chinese_keywords_match_as_substrings() -> None:
    assert names("今天天气怎么样") == ["get_weather"]
    assert names("明天会下雨吗") == ["get_weather"]
    assert names("把音量调大一点") == ["set_volume"]


def test_chinese_text_does_not_trigger_english_keywords() -> None:
    assert names("现在几点") == []


def test_english_keyword_inside_chinese_text() -> None:
    # words are runs of [a-z0-9']: an English keyword embedded in Chinese still counts
    assert names("现在time是几点") == ["get_time"]


def test_several_tools_keep_their_order() -> None:
    assert names("Louder please, and what's the weather and the time?") == ["get_time", "get_weather", "set_volume"]


def test_a_tool_is_offered_once_even_with_several_keywords() -> None:
    assert names("time clock date") == ["get_time"]


def test_no_tools() -> None:
    assert relevant_tools("what time is it", []) == []


def test_returns_the_same_tool_objects() -> None:
    chosen = relevant_tools("time", TOOLS)
    assert chosen[0] is TIME


# --------------------------------------------------------------------------- tools without keywords


def test_name_keywords() -> None:
    assert name_keywords("self.audio_speaker.set_volume") == ["audio", "speaker", "volume"]
    assert name_keywords("get_time") == ["time"]
    assert name_keywords("self.screen.set-brightness") == ["screen", "brightness"]
    assert name_keywords("Tool 2 Lamp") == ["lamp"]
    assert name_keywords("get_the_tool") == []


def test_tool_without_keywords_is_matched_on_its_name() -> None:
    speaker = tool("self.audio_speaker.set_volume")
    assert names("turn the volume down", [speaker]) == ["self.audio_speaker.set_volume"]
    assert names("is the speaker on", [speaker]) == ["self.audio_speaker.set_volume"]
    assert names("tell me a joke", [speaker]) == []
    # "set" is a stop word: it says nothing about what the tool does
    assert names("set a timer", [speaker]) == []


def test_explicit_keywords_replace_name_matching() -> None:
    lamp = tool("self.lamp.turn_on", "light")
    assert names("switch on the light", [lamp]) == ["self.lamp.turn_on"]
    assert names("the lamp please", [lamp]) == []


def test_tool_whose_name_has_only_stop_words_is_never_offered() -> None:
    assert names("get the tool", [tool("get_the_tool")]) == []
