"""What the system itself says, in every language an agent can pick (``llm_svc.prompt.LANGUAGES``).

Fixed phrases (the greeting, "busy", "sorry", the farewell) and tool answers such as the time
are written here per language, so a Chinese agent never speaks an English template. A language
not listed falls back to English.
"""

from __future__ import annotations

import datetime as dt

LANGUAGES = ("en", "zh", "de", "fr", "es", "ja", "ko")

# Fixed phrases by language. The gateway's own settings (gateway.busy_text, ...) are the English
# ones and, where an operator changed them, replace the English entry.
PHRASES: dict[str, dict[str, str]] = {
    "en": {
        "slow_down": "You're talking faster than I can keep up. Please wait a moment.",
        "greeting": "Hi, I'm listening.",
        "busy": "Sorry, I'm busy right now. Please try again in a moment.",
        "sorry": "Sorry, something went wrong. Please try again.",
        "farewell": "Goodbye, talk to you soon.",
        "not_understood": "Sorry, I didn't catch that.",
    },
    "zh": {
        "slow_down": "你说得太快了，我跟不上，请稍等一下。",
        "greeting": "你好，我在听。",
        "busy": "抱歉，我现在有点忙，请稍后再试。",
        "sorry": "抱歉，出了点问题，请再试一次。",
        "farewell": "再见，下次再聊。",
        "not_understood": "抱歉，我没听清楚。",
    },
    "de": {
        "slow_down": "Du sprichst schneller, als ich folgen kann. Bitte warte einen Moment.",
        "greeting": "Hallo, ich höre zu.",
        "busy": "Entschuldigung, ich bin gerade beschäftigt. Bitte versuch es gleich noch einmal.",
        "sorry": "Entschuldigung, da ist etwas schiefgegangen. Bitte versuch es noch einmal.",
        "farewell": "Tschüss, bis bald.",
        "not_understood": "Entschuldigung, das habe ich nicht verstanden.",
    },
    "fr": {
        "slow_down": "Vous parlez plus vite que je ne peux suivre. Attendez un instant, s'il vous plaît.",
        "greeting": "Bonjour, je vous écoute.",
        "busy": "Désolé, je suis occupé. Réessayez dans un instant.",
        "sorry": "Désolé, un problème est survenu. Veuillez réessayer.",
        "farewell": "Au revoir, à bientôt.",
        "not_understood": "Désolé, je n'ai pas compris.",
    },
    "es": {
        "slow_down": "Hablas más rápido de lo que puedo seguir. Espera un momento, por favor.",
        "greeting": "Hola, te escucho.",
        "busy": "Lo siento, estoy ocupado. Inténtalo de nuevo en un momento.",
        "sorry": "Lo siento, algo salió mal. Inténtalo de nuevo.",
        "farewell": "Adiós, hasta pronto.",
        "not_understood": "Lo siento, no te he entendido.",
    },
    "ja": {
        "slow_down": "話すのが速すぎてついていけません。少しお待ちください。",
        "greeting": "はい、聞いています。",
        "busy": "すみません、今混み合っています。少し待ってからもう一度お試しください。",
        "sorry": "すみません、問題が発生しました。もう一度お試しください。",
        "farewell": "さようなら、またね。",
        "not_understood": "すみません、聞き取れませんでした。",
    },
    "ko": {
        "slow_down": "너무 빨리 말씀하셔서 따라갈 수 없어요. 잠시만 기다려 주세요.",
        "greeting": "네, 듣고 있어요.",
        "busy": "죄송해요, 지금은 바빠요. 잠시 후에 다시 시도해 주세요.",
        "sorry": "죄송해요, 문제가 생겼어요. 다시 시도해 주세요.",
        "farewell": "안녕히 가세요, 또 이야기해요.",
        "not_understood": "죄송해요, 잘 못 들었어요.",
    },
}


def base_language(language: str | None) -> str:
    """``zh-CN`` -> ``zh``; None or an unlisted language -> ``en``."""
    code = (language or "en").split("-")[0].split("_")[0].lower()
    return code if code in PHRASES else "en"


def phrase(key: str, language: str | None, english: str | None = None) -> str:
    """The fixed phrase ``key`` in ``language``; ``english`` (an operator's setting) replaces
    the English one."""
    code = base_language(language)
    if code == "en" and english:
        return english
    return PHRASES[code][key]


ZH_WEEKDAYS = "一二三四五六日"
_DE_WEEKDAYS = ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"]
_DE_MONTHS = ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober", "November", "Dezember"]
_FR_WEEKDAYS = ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"]
_FR_MONTHS = ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre", "décembre"]
_ES_WEEKDAYS = ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"]
_ES_MONTHS = ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre"]
_JA_WEEKDAYS = "月火水木金土日"
_KO_WEEKDAYS = "월화수목금토일"


def zh_day_part(hour: int) -> str:
    """凌晨 / 上午 / 中午 / 下午 / 晚上, as a Mandarin speaker names the time of day."""
    if hour < 6:
        return "凌晨"
    if hour < 12:
        return "上午"
    if hour < 13:
        return "中午"
    if hour < 18:
        return "下午"
    return "晚上"


def say_time(now: dt.datetime, language: str | None) -> str:
    """The current time, date and weekday as a person says it in ``language``."""
    code = base_language(language)
    wd = now.weekday()
    if code == "zh":
        hour12 = now.hour % 12 or 12
        minute = "整" if now.minute == 0 else (f"零{now.minute}分" if now.minute < 10 else f"{now.minute}分")
        return f"现在是{now.year}年{now.month}月{now.day}日，星期{ZH_WEEKDAYS[wd]}，{zh_day_part(now.hour)}{hour12}点{minute}。"
    if code == "ja":
        return f"今は{now.year}年{now.month}月{now.day}日、{_JA_WEEKDAYS[wd]}曜日、{now.hour}時{now.minute}分です。"
    if code == "ko":
        return f"지금은 {now.year}년 {now.month}월 {now.day}일 {_KO_WEEKDAYS[wd]}요일, {now.hour}시 {now.minute}분이에요."
    if code == "de":
        return f"Es ist {now.hour}:{now:%M} Uhr am {_DE_WEEKDAYS[wd]}, dem {now.day}. {_DE_MONTHS[now.month - 1]} {now.year}."
    if code == "fr":
        return f"Il est {now.hour} h {now:%M}, le {_FR_WEEKDAYS[wd]} {now.day} {_FR_MONTHS[now.month - 1]} {now.year}."
    if code == "es":
        return f"Son las {now.hour}:{now:%M} del {_ES_WEEKDAYS[wd]} {now.day} de {_ES_MONTHS[now.month - 1]} de {now.year}."
    hour = now.strftime("%I").lstrip("0") or "12"
    return f"It is {hour}:{now:%M} {now:%p} on {now:%A}, {now:%B} {now.day}, {now.year}."


# What the built-in tools say, by language ({name}, {place}... filled in by the tool).
TOOL_PHRASES: dict[str, dict[str, str]] = {
    "en": {"goodbye": "Goodbye! Talk to you soon.", "role_changed": "Okay, from now on I am your {role}.",
           "no_music": "Sorry, I have no music to play yet.", "now_playing": "Now playing {name}.",
           "no_news": "I found no news right now.", "unknown_place": "Sorry, I could not find a place called {place}."},
    "zh": {"goodbye": "再见，下次再聊！", "role_changed": "好的，从现在起我就是你的{role}。",
           "no_music": "抱歉，我还没有可以播放的音乐。", "now_playing": "正在播放{name}。",
           "no_news": "现在没有找到新闻。", "unknown_place": "抱歉，我找不到叫{place}的地方。"},
    "de": {"goodbye": "Tschüss, bis bald!", "role_changed": "Okay, ab jetzt bin ich dein {role}.",
           "no_music": "Entschuldigung, ich habe noch keine Musik.", "now_playing": "Jetzt läuft {name}.",
           "no_news": "Ich habe gerade keine Nachrichten gefunden.", "unknown_place": "Entschuldigung, ich finde keinen Ort namens {place}."},
    "fr": {"goodbye": "Au revoir, à bientôt !", "role_changed": "D'accord, désormais je suis votre {role}.",
           "no_music": "Désolé, je n'ai pas encore de musique.", "now_playing": "Voici {name}.",
           "no_news": "Je n'ai trouvé aucune actualité pour le moment.", "unknown_place": "Désolé, je ne trouve aucun lieu appelé {place}."},
    "es": {"goodbye": "¡Adiós, hasta pronto!", "role_changed": "Vale, a partir de ahora soy tu {role}.",
           "no_music": "Lo siento, todavía no tengo música.", "now_playing": "Ahora suena {name}.",
           "no_news": "No he encontrado noticias ahora mismo.", "unknown_place": "Lo siento, no encuentro ningún lugar llamado {place}."},
    "ja": {"goodbye": "さようなら、またね！", "role_changed": "わかりました、これからは{role}です。",
           "no_music": "すみません、まだ再生できる音楽がありません。", "now_playing": "{name}を再生します。",
           "no_news": "今はニュースが見つかりませんでした。", "unknown_place": "すみません、{place}という場所が見つかりません。"},
    "ko": {"goodbye": "안녕히 가세요, 또 만나요!", "role_changed": "좋아요, 지금부터 저는 당신의 {role}이에요.",
           "no_music": "죄송해요, 아직 재생할 음악이 없어요.", "now_playing": "{name} 재생할게요.",
           "no_news": "지금은 뉴스를 찾지 못했어요.", "unknown_place": "죄송해요, {place}라는 곳을 찾을 수 없어요."},
}


def tool_phrase(key: str, language: str | None, **values: str) -> str:
    """A built-in tool's sentence in ``language`` (English where the language is not listed)."""
    return TOOL_PHRASES[base_language(language)][key].format(**values)


def has_script_of(text: str, language: str | None) -> bool:
    """Whether ``text`` is written in the script ``language`` uses (a CJK language needs CJK
    characters; the others pass): a model's English goodbye is no goodbye for a Chinese agent."""
    code = base_language(language)
    if code == "zh":
        return any("\u4e00" <= ch <= "\u9fff" for ch in text)
    if code == "ja":
        return any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in text)
    if code == "ko":
        return any("\uac00" <= ch <= "\ud7a3" for ch in text)
    return True


# WMO weather codes (as Open-Meteo reports them) in Mandarin.
ZH_WMO = {
    0: "晴", 1: "晴间多云", 2: "多云", 3: "阴", 45: "有雾", 48: "冻雾", 51: "小毛毛雨", 53: "毛毛雨", 55: "大毛毛雨",
    56: "冻毛毛雨", 57: "冻毛毛雨", 61: "小雨", 63: "中雨", 65: "大雨", 66: "冻雨", 67: "冻雨", 71: "小雪", 73: "中雪",
    75: "大雪", 77: "米雪", 80: "阵雨", 81: "阵雨", 82: "强阵雨", 85: "阵雪", 86: "强阵雪", 95: "雷阵雨",
    96: "雷阵雨伴有冰雹", 99: "雷阵雨伴有冰雹",
}
ZH_DAYS = {"today": "今天", "tomorrow": "明天", "day_after_tomorrow": "后天"}


def zh_degrees(value: int) -> str:
    """-3 -> 零下3度, as a forecast says it in Mandarin."""
    return f"零下{-value}度" if value < 0 else f"{value}度"
