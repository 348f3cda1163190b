"""Cutting a streamed LLM answer into speakable sentences, as early as possible.

The first sentence goes to TTS the moment it can be spoken (and may be cut at a comma when it
is already long enough), because it sets the voice-to-voice latency; later sentences are cut at
sentence ends only, and very short ones are merged with the next so TTS gets natural phrases.
Markdown and emojis are removed: they are not speakable.
"""

from __future__ import annotations

import re

_HARD_END = set("。！？!?；;\n")
_SOFT_END = set("，,、:：")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_EMOJI = re.compile(
    "[\U0001F300-\U0001FAFF\U00002600-\U000027BF\U0001F000-\U0001F02F\U0001F0A0-\U0001F0FF\U0001F100-\U0001F1FF\U0001F900-\U0001F9FF\uFE0F\u200d]"
)
_MARKDOWN = re.compile(r"(\*\*|__|\*|`+|^#+\s*|^\s*[-•]\s+|^\s*\d+\.\s+(?=\S))", re.MULTILINE)

EMOJI_EMOTION = {
    "😊": "happy", "🙂": "happy", "😀": "happy", "😄": "laughing", "😆": "laughing", "😂": "funny",
    "🤣": "funny", "😢": "sad", "😔": "sad", "😭": "crying", "😠": "angry", "😡": "angry",
    "😍": "loving", "❤": "loving", "😳": "embarrassed", "😯": "surprised", "😮": "surprised",
    "😱": "shocked", "🤔": "thinking", "😉": "winking", "😎": "cool", "😌": "relaxed",
    "🤤": "delicious", "😘": "kissy", "😏": "confident", "😴": "sleepy", "😜": "silly", "🙄": "confused",
    "😶": "neutral",
}


def detect_emotion(text: str, default: str = "happy") -> str:
    """The emotion of the first known emoji in ``text``."""
    for char in text:
        if char in EMOJI_EMOTION:
            return EMOJI_EMOTION[char]
    return default


def speakable(text: str) -> str:
    """Text with markdown markers and emojis removed and whitespace collapsed."""
    text = _EMOJI.sub("", text)
    text = _MARKDOWN.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def _has_content(text: str) -> bool:
    return bool(re.search(r"\w", text))


def _length(text: str) -> int:
    """Length in 'words': CJK characters count one each."""
    return len(_CJK.findall(text)) + len(re.findall(r"[A-Za-z0-9']+", text))


class SentenceSplitter:
    """Feed text deltas with :meth:`push`; get complete sentences back; :meth:`flush` at the end."""

    def __init__(self, first_min_words: int = 4, min_words: int = 3, soft_cut_words: int = 12) -> None:
        self.first_min_words = first_min_words
        self.min_words = min_words
        self.soft_cut_words = soft_cut_words
        self._buffer = ""
        self.emitted = 0
        self.raw = ""  # everything pushed, for emotion detection and history

    def push(self, delta: str) -> list[str]:
        self.raw += delta
        self._buffer += delta
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                break
            piece, self._buffer = self._buffer[:cut], self._buffer[cut:]
            sentence = speakable(piece)
            if _has_content(sentence):
                out.append(sentence)
                self.emitted += 1
        return out

    def flush(self) -> list[str]:
        sentence = speakable(self._buffer)
        self._buffer = ""
        if _has_content(sentence):
            self.emitted += 1
            return [sentence]
        return []

    def _find_cut(self) -> int | None:
        """Index just past the end of the next sentence in the buffer, or None."""
        text = self._buffer
        min_words = self.first_min_words if self.emitted == 0 else self.min_words
        for i, char in enumerate(text):
            end = i + 1
            if char in _HARD_END or (char == "." and self._period_ends_sentence(text, i)):
                # Swallow closing quotes and repeated punctuation.
                while end < len(text) and text[end] in "\"'”’)）」.!?。！？":
                    end += 1
                if end >= len(text):
                    # wait: "3." may become "3.5", and "?!", "..." or a closing quote may follow
                    # (deciding now would cut differently depending on how the text was chunked)
                    return None
                if char != "\n" and _length(text[:end]) < min_words:
                    continue  # too short to speak alone: merge with what follows
                return end
            if char in _SOFT_END and self.emitted == 0 and _length(text[:end]) >= self.soft_cut_words:
                # A long first clause: speak it now rather than wait for the full stop.
                return end
        return None

    @staticmethod
    def _period_ends_sentence(text: str, i: int) -> bool:
        before = text[i - 1] if i > 0 else ""
        after = text[i + 1] if i + 1 < len(text) else ""
        if before.isdigit() and after.isdigit():
            return False  # 3.5
        if after and not after.isspace() and after not in "\"'”’)":
            return False  # e.g. / a.m. / URLs
        word = re.findall(r"(\w+(?:\.\w+)*)$", text[:i])  # "dr", also "e.g", "p.m"
        if word and word[0].lower() in {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "a.m", "p.m"}:
            return False
        return True
