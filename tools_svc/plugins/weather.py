"""``get_weather``: current weather and the forecast, from an Open-Meteo-compatible HTTP API."""

from __future__ import annotations

from typing import Any

import aiohttp

from shared.messages import ToolCall, ToolResult, ToolSpec
from shared.phrases import ZH_DAYS, ZH_WMO, base_language, tool_phrase, zh_degrees

SPEC = ToolSpec(
    name="get_weather",
    description="Get the weather for a city: now, today, tomorrow or the day after tomorrow.",
    parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City name, e.g. Berlin"},
            "day": {"type": "string", "enum": ["now", "today", "tomorrow", "day_after_tomorrow"]},
        },
        "required": [],
    },
    keywords=["weather", "temperature", "rain", "raining", "snow", "sunny", "forecast", "umbrella", "天气", "下雨", "气温"],
)

# WMO weather interpretation codes, as Open-Meteo reports them.
WMO = {
    0: "clear sky", 1: "mainly clear", 2: "partly cloudy", 3: "overcast", 45: "fog", 48: "freezing fog",
    51: "light drizzle", 53: "drizzle", 55: "heavy drizzle", 56: "freezing drizzle", 57: "freezing drizzle",
    61: "light rain", 63: "rain", 65: "heavy rain", 66: "freezing rain", 67: "freezing rain",
    71: "light snow", 73: "snow", 75: "heavy snow", 77: "snow grains", 80: "rain showers", 81: "rain showers",
    82: "violent rain showers", 85: "snow showers", 86: "heavy snow showers", 95: "thunderstorms",
    96: "thunderstorms with hail", 99: "thunderstorms with hail",
}
DAY_INDEX = {"today": 0, "tomorrow": 1, "day_after_tomorrow": 2}


def describe(place: str, data: dict[str, Any], day: str, language: str | None = None) -> str:
    """A sentence to speak from a forecast answer, in Mandarin for ``zh``, else English."""
    if base_language(language) == "zh":
        if day == "now":
            current = data["current"]
            return f"{place}现在{ZH_WMO.get(int(current['weather_code']), '天气多变')}，气温{zh_degrees(round(current['temperature_2m']))}。"
        i = DAY_INDEX[day]
        low, high = round(data["daily"]["temperature_2m_min"][i]), round(data["daily"]["temperature_2m_max"][i])
        return f"{place}{ZH_DAYS[day]}{ZH_WMO.get(int(data['daily']['weather_code'][i]), '天气多变')}，{zh_degrees(low)}到{zh_degrees(high)}。"
    if day == "now":
        current = data["current"]
        return f"In {place} it is now {round(current['temperature_2m'])} degrees with {WMO.get(int(current['weather_code']), 'mixed weather')}."
    daily = data["daily"]
    i = DAY_INDEX[day]
    label = {"today": "Today", "tomorrow": "Tomorrow", "day_after_tomorrow": "The day after tomorrow"}[day]
    low, high = round(daily["temperature_2m_min"][i]), round(daily["temperature_2m_max"][i])
    sky = WMO.get(int(daily["weather_code"][i]), "mixed weather")
    return f"{label} in {place}: {sky}, from {low} to {high} degrees."


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    settings = context["settings"].weather
    location = str(request.arguments.get("location") or settings.default_location).strip()
    said = request.utterance.lower()
    guessed = "day_after_tomorrow" if "后天" in said else "tomorrow" if ("tomorrow" in said or "明天" in said) else "today" if "今天" in said else "now"
    day = request.arguments.get("day") or guessed
    if day not in ("now", *DAY_INDEX):
        day = "now"
    http: aiohttp.ClientSession = context["http"]
    timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
    async with http.get(settings.geocoding_url, params={"name": location, "count": 1, "language": base_language(request.language), "format": "json"}, timeout=timeout) as response:
        response.raise_for_status()
        places = (await response.json(content_type=None)).get("results") or []
    if not places:
        return ToolResult(name=SPEC.name, action="response", text=tool_phrase("unknown_place", request.language, place=location))
    place = places[0]
    params = {
        "latitude": place["latitude"],
        "longitude": place["longitude"],
        "current": "temperature_2m,weather_code",
        "daily": "weather_code,temperature_2m_max,temperature_2m_min",
        "timezone": "auto",
        "forecast_days": 3,
    }
    async with http.get(settings.forecast_url, params=params, timeout=timeout) as response:
        response.raise_for_status()
        data = await response.json(content_type=None)
    return ToolResult(name=SPEC.name, action="response", text=describe(place.get("name", location), data, day, request.language))
