"""``get_news``: the latest headlines from an RSS feed."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import aiohttp

from shared.phrases import tool_phrase
from shared.messages import ToolCall, ToolResult, ToolSpec

SPEC = ToolSpec(
    name="get_news",
    description="Read the latest news headlines.",
    parameters={"type": "object", "properties": {}, "required": []},
    keywords=["news", "headlines", "happening", "新闻", "头条"],
)


def headlines(feed: bytes, count: int) -> list[str]:
    """Item titles of an RSS 2.0 (or Atom) feed, first ``count``."""
    root = ET.fromstring(feed)
    titles = [el.text or "" for el in root.iter() if el.tag.split("}")[-1] == "title" and el is not root.find("./channel/title")]
    items = [t for t in (re.sub(r"\s+", " ", t).strip() for t in _item_titles(root)) if t]
    return (items or titles)[:count]


def _item_titles(root: ET.Element) -> list[str]:
    out = []
    for el in root.iter():
        if el.tag.split("}")[-1] in ("item", "entry"):
            for child in el:
                if child.tag.split("}")[-1] == "title":
                    out.append(child.text or "")
                    break
    return out


async def call(request: ToolCall, context: dict[str, Any]) -> ToolResult:
    settings = context["settings"].news
    http: aiohttp.ClientSession = context["http"]
    async with http.get(settings.rss_url, timeout=aiohttp.ClientTimeout(total=settings.timeout_s)) as response:
        response.raise_for_status()
        body = await response.read()
    try:
        titles = headlines(body, settings.headlines)
    except ET.ParseError:
        return ToolResult(name=SPEC.name, ok=False, action="error", text="the news feed is not valid RSS")
    if not titles:
        return ToolResult(name=SPEC.name, action="response", text=tool_phrase("no_news", request.language))
    text = "Here are the latest headlines. " + " ".join(t if t.endswith((".", "!", "?")) else t + "." for t in titles)
    return ToolResult(name=SPEC.name, action="response", text=text)
