"""Server plugins against local servers that speak the real APIs' request and response shapes."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from nats.aio.client import Client as NATS

from shared.messages import ToolCall, ToolList, ToolResult
from shared.subjects import Subjects
from tests.conftest import local_http
from xiaozhi.stack import free_port

S = Subjects()

RSS = b"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Test News</title><link>http://x</link><description>d</description>
<item><title>Rivers rise after heavy rain</title><link>http://x/1</link></item>
<item><title><![CDATA[New bridge opens in the city]]></title><link>http://x/2</link></item>
<item><title>Local team wins the cup!</title><link>http://x/3</link></item>
<item><title>Fourth story</title><link>http://x/4</link></item>
</channel></rss>"""


@pytest.fixture
async def fake_apis():
    """Open-Meteo geocoding + forecast, an RSS feed and Home Assistant's REST API, on one port."""
    seen: dict[str, list] = {"geo": [], "forecast": [], "hass": []}
    states = {"light.living_room": "off"}

    async def geocode(request: web.Request) -> web.Response:
        seen["geo"].append(dict(request.query))
        if request.query.get("name", "").lower() == "atlantis":
            return web.json_response({"generationtime_ms": 0.5})
        return web.json_response({"results": [{"id": 2950159, "name": "Berlin", "latitude": 52.52437, "longitude": 13.41053, "country": "Germany", "timezone": "Europe/Berlin"}], "generationtime_ms": 0.9})

    async def forecast(request: web.Request) -> web.Response:
        seen["forecast"].append(dict(request.query))
        return web.json_response({
            "latitude": 52.52, "longitude": 13.41, "timezone": "Europe/Berlin",
            "current_units": {"temperature_2m": "°C", "weather_code": "wmo code"},
            "current": {"time": "2026-11-24T17:00", "interval": 900, "temperature_2m": 6.4, "weather_code": 3},
            "daily_units": {"temperature_2m_max": "°C"},
            "daily": {"time": ["2026-11-24", "2026-11-25", "2026-11-26"], "weather_code": [3, 61, 0],
                      "temperature_2m_max": [8.1, 9.6, 5.0], "temperature_2m_min": [2.2, 4.4, -1.3]},
        })

    async def rss(_request: web.Request) -> web.Response:
        return web.Response(body=RSS, content_type="application/rss+xml")

    async def hass_state(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer hass-token":
            return web.json_response({"message": "Invalid authentication"}, status=401)
        entity = request.match_info["entity"]
        seen["hass"].append(("GET", entity))
        return web.json_response({"entity_id": entity, "state": states[entity], "attributes": {"friendly_name": "Living room"}})

    async def hass_service(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer hass-token":
            return web.json_response({"message": "Invalid authentication"}, status=401)
        body = await request.json()
        seen["hass"].append(("POST", request.match_info["domain"], request.match_info["service"], body))
        states[body["entity_id"]] = "on" if request.match_info["service"] == "turn_on" else "off"
        return web.json_response([{"entity_id": body["entity_id"], "state": states[body["entity_id"]]}])

    app = web.Application()
    app.router.add_get("/v1/search", geocode)
    app.router.add_get("/v1/forecast", forecast)
    app.router.add_get("/rss.xml", rss)
    app.router.add_get("/api/states/{entity}", hass_state)
    app.router.add_post("/api/services/{domain}/{service}", hass_service)
    async with local_http(app) as url:
        yield url, seen


async def call(nc: NATS, name: str, **arguments) -> ToolResult:
    reply = await nc.request(S.tool(name), ToolCall(name=name, arguments=arguments, device_id="d").encode(), timeout=10)
    return ToolResult.decode(reply.data)


async def test_weather_news_and_home_assistant(nats_only, fake_apis):
    base, seen = fake_apis
    proc = nats_only.start_service("tools", free_port(), {
        "XZ_TOOLS__WEATHER__FORECAST_URL": f"{base}/v1/forecast",
        "XZ_TOOLS__WEATHER__GEOCODING_URL": f"{base}/v1/search",
        "XZ_TOOLS__NEWS__RSS_URL": f"{base}/rss.xml",
        "XZ_TOOLS__HOME_ASSISTANT__BASE_URL": base,
        "XZ_TOOLS__HOME_ASSISTANT__TOKEN": "hass-token",
        "XZ_TOOLS__HOME_ASSISTANT__ENTITIES": json.dumps({"living room light": "light.living_room"}),
    })
    nats_only.wait_healthy([proc])
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        listing = ToolList.decode((await nc.request(S.tools_list, b"", timeout=5)).data)
        names = {t.name: t for t in listing.tools}
        assert {"get_weather", "get_news", "hass_get_state", "hass_set_state", "play_music", "change_role", "get_lunar_date"} <= set(names)
        assert names["hass_set_state"].parameters["properties"]["device"]["enum"] == ["living room light"]

        now = await call(nc, "get_weather", location="Berlin")
        assert now.ok and now.action == "response"
        assert now.text == "In Berlin it is now 6 degrees with overcast."
        tomorrow = await call(nc, "get_weather", location="Berlin", day="tomorrow")
        assert tomorrow.text == "Tomorrow in Berlin: light rain, from 4 to 10 degrees."
        assert seen["geo"][0]["name"] == "Berlin"
        assert seen["forecast"][0]["latitude"] == "52.52437" and "temperature_2m" in seen["forecast"][0]["current"]
        nowhere = await call(nc, "get_weather", location="Atlantis")
        assert "could not find" in nowhere.text
        bad_day = await call(nc, "get_weather", day="yesterday")
        assert not bad_day.ok and "one of" in bad_day.text  # schema enum checked before the call

        news = await call(nc, "get_news")
        assert news.text == "Here are the latest headlines. Rivers rise after heavy rain. New bridge opens in the city. Local team wins the cup!"

        state = await call(nc, "hass_get_state", device="living room light")
        assert state.text == "The living room light is off."
        switched = await call(nc, "hass_set_state", device="living room light", state="on")
        assert switched.ok and switched.text == "Okay, the living room light is on."
        assert ("POST", "light", "turn_on", {"entity_id": "light.living_room"}) in seen["hass"]
        assert (await call(nc, "hass_get_state", device="living room light")).text == "The living room light is on."
        unknown = await call(nc, "hass_set_state", device="garage", state="on")
        assert not unknown.ok
    finally:
        await nc.close()


async def test_plugin_failure_is_an_error_result(nats_only):
    dead = f"http://127.0.0.1:{free_port()}"
    proc = nats_only.start_service("tools", free_port(), {"XZ_TOOLS__NEWS__RSS_URL": f"{dead}/rss.xml", "XZ_TOOLS__WEATHER__GEOCODING_URL": f"{dead}/v1/search"})
    nats_only.wait_healthy([proc])
    nc = NATS()
    await nc.connect(nats_only.nats_url)
    try:
        for name in ("get_news", "get_weather"):
            result = await call(nc, name)
            assert not result.ok and result.action == "error" and "failed" in result.text
    finally:
        await nc.close()
