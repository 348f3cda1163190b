"""llm_svc.sentences: streaming sentence splitting, speakable text, emotion detection."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_svc.sentences import SentenceSplitter, detect_emotion, speakable


def by_char(text: str, **kw) -> list[str]:
    splitter = SentenceSplitter(**kw)
    out: list[str] = []
    for char in text:
        out += splitter.push(char)
    return out + splitter.flush()


def by_chunks(chunks: list[str], **kw) -> list[str]:
    splitter = SentenceSplitter(**kw)
    out: list[str] = []
    for chunk in chunks:
        out += splitter.push(chunk)
    return out + splitter.flush()


def chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def nospace(text: str) -> str:
    return re.sub(r"\s+", "", text)


CASES = {
    "decimal": (
        "It costs 3.5 dollars today. Is that okay with you?",
        ["It costs 3.5 dollars today.", "Is that okay with you?"],
    ),
    "abbreviation": (
        "I met Dr. Smith at the clinic. He was very nice.",
        ["I met Dr. Smith at the clinic.", "He was very nice."],
    ),
    "dotted abbreviations": (
        "We can meet at 3 p.m. near the park. I like fruit, e.g. apples and pears.",
        ["We can meet at 3 p.m. near the park.", "I like fruit, e.g. apples and pears."],
    ),
    "ellipsis": (
        "Well... I am not sure about that. Maybe we can try later.",
        ["Well... I am not sure about that.", "Maybe we can try later."],
    ),
    "question and exclamation": (
        "Really?! That is amazing news! Can you tell me more?",
        ["Really?! That is amazing news!", "Can you tell me more?"],
    ),
    "chinese": (
        "今天天气很好。我们去公园吧！你觉得怎么样？",
        ["今天天气很好。", "我们去公园吧！", "你觉得怎么样？"],
    ),
    "closing quote": (
        'He said "I will be right back." Then he left the room.',
        ['He said "I will be right back."', "Then he left the room."],
    ),
    "url": (
        "Visit example.com for more details on this. Thanks a lot.",
        ["Visit example.com for more details on this.", "Thanks a lot."],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_known_splits(name: str) -> None:
    text, expected = CASES[name]
    assert by_chunks([text]) == expected


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
def test_chunking_does_not_change_sentences(name: str, size: int) -> None:
    text, expected = CASES[name]
    assert by_chunks(chunked(text, size)) == expected
    assert by_char(text) == expected


def test_closing_punctuation_split_across_deltas_stays_with_its_sentence() -> None:
    # "?", '"' and ")" arriving as separate deltas must not start the next sentence.
    expected = ['She asked "are you coming?")', "I said yes of course."]
    text = 'She asked "are you coming?") I said yes of course.'
    assert by_chunks([text]) == expected
    assert by_char(text) == expected
    assert by_chunks(['She asked "are you coming', "?", '"', ")", " I said yes of course."]) == expected


def test_chinese_closing_quote_split_across_deltas() -> None:
    text = "他说：“我们明天见。”好的，没问题。"
    assert by_char(text) == by_chunks([text]) == ["他说：“我们明天见。”", "好的，没问题。"]


def test_repeated_marks_split_across_deltas() -> None:
    text = "That is so amazing!!! Tell me more about it."
    expected = ["That is so amazing!!!", "Tell me more about it."]
    assert by_chunks([text]) == expected
    assert by_char(text) == expected


def test_a_period_at_the_end_of_a_delta_waits_for_the_next() -> None:
    s = SentenceSplitter()
    assert s.push("It costs about 3.") == []  # might be "3.5"
    assert s.push("5 dollars. And") == ["It costs about 3.5 dollars."]
    assert s.flush() == ["And"]


def test_decimal_split_across_deltas() -> None:
    assert by_chunks(["The answer is 3", ".", "14159 exactly. Yes", " it is."]) == [
        "The answer is 3.14159 exactly.",
        "Yes it is.",
    ]


def test_first_sentence_is_emitted_as_soon_as_possible() -> None:
    s = SentenceSplitter()
    assert s.push("Sure, I can help you.") == []  # "." may still become "..."
    assert s.push(" ") == ["Sure, I can help you."]
    assert s.emitted == 1


def test_newline_ends_a_sentence_regardless_of_length() -> None:
    assert by_char("Hi\nthere\n") == ["Hi", "there"]


def test_short_sentences_merge_with_the_next() -> None:
    assert by_char("Hi. How are you doing today my friend?") == ["Hi. How are you doing today my friend?"]
    assert by_char("Ok. Sure. I can do that for you right now.") == ["Ok. Sure. I can do that for you right now."]


def test_short_later_sentences_merge_with_min_words() -> None:
    # after the first sentence, min_words (3) applies
    text = "This is the first sentence here. Yes. No. That is all I have."
    assert by_char(text) == ["This is the first sentence here.", "Yes. No. That is all I have."]


def test_a_short_last_sentence_is_flushed_alone() -> None:
    assert by_char("Are you sure about that? Yes.") == ["Are you sure about that?", "Yes."]


def test_long_first_clause_is_cut_at_a_comma() -> None:
    text = "When the sun comes up over the big blue hills and the birds begin to sing, we will go outside and play."
    assert by_char(text) == [
        "When the sun comes up over the big blue hills and the birds begin to sing,",
        "we will go outside and play.",
    ]


def test_short_first_clause_is_not_cut_at_a_comma() -> None:
    assert by_char("Well, I think that is a good idea.") == ["Well, I think that is a good idea."]


def test_only_the_first_sentence_is_cut_at_a_comma() -> None:
    first = "Okay let us begin."
    second = "After the sun comes up over the big blue hills and the birds begin to sing, we will go."
    assert by_char(f"{first} {second}") == [first, second]


def test_soft_cut_threshold_is_configurable() -> None:
    assert by_char("One two three, four five six.", soft_cut_words=3) == ["One two three,", "four five six."]


def test_chinese_long_first_clause_is_cut_at_a_chinese_comma() -> None:
    text = "今天天气很好我们一起去公园散步吧，你觉得怎么样呢。"
    assert by_char(text) == ["今天天气很好我们一起去公园散步吧，", "你觉得怎么样呢。"]


def test_markdown_and_emojis_are_removed_from_sentences() -> None:
    text = "**Sure!** Here is a `tip` for you 😊 today.\n# Title\n- first item here\n- second item here\n1. numbered one\n"
    assert by_char(text) == ["Sure! Here is a tip for you today.", "Title", "first item here", "second item here", "numbered one"]


def test_emoji_only_and_punctuation_only_output_is_not_a_sentence() -> None:
    assert by_char("😊😊") == []
    assert by_char("...") == []
    assert by_char("") == []
    assert by_char("   \n\n  ") == []


def test_raw_keeps_everything_for_emotion_detection() -> None:
    s = SentenceSplitter()
    s.push("Hello 😢 ")
    s.push("**world**. More")
    s.flush()
    assert s.raw == "Hello 😢 **world**. More"


def test_flush_resets_the_buffer() -> None:
    s = SentenceSplitter()
    s.push("half a thought")
    assert s.flush() == ["half a thought"]
    assert s.flush() == []


# --------------------------------------------------------------------------- speakable


@pytest.mark.parametrize(
    "text, expected",
    [
        ("**Bold** and __under__ text", "Bold and under text"),
        ("*em* and `code` and ```block```", "em and code and block"),
        ("# Heading", "Heading"),
        ("### Deep heading", "Deep heading"),
        ("- item one\n- item two", "item one item two"),
        ("• bullet", "bullet"),
        ("1. first\n2. second", "first second"),
        ("Hello 😀 world 👍🏽 ❤️ 🤔", "Hello world"),
        ("  lots   of \n\n spaces\t", "lots of spaces"),
        ("Version 3.5 is out", "Version 3.5 is out"),
        ("Pay 2. Then go", "Pay 2. Then go"),  # a number inside a line is not a list marker
        ("a - b", "a - b"),  # a dash inside a line is not a bullet
        ("你好😊世界", "你好世界"),
    ],
)
def test_speakable(text: str, expected: str) -> None:
    assert speakable(text) == expected


# --------------------------------------------------------------------------- detect_emotion


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I am so sad 😢 today 😊", "sad"),
        ("😊 then 😢", "happy"),
        ("haha 😂", "funny"),
        ("hmm 🤔", "thinking"),
        ("love it ❤️", "loving"),
        ("no emoji here", "happy"),
        ("unknown emoji 🦄", "happy"),
        ("", "happy"),
    ],
)
def test_detect_emotion(text: str, expected: str) -> None:
    assert detect_emotion(text) == expected


def test_detect_emotion_default() -> None:
    assert detect_emotion("plain text", default="neutral") == "neutral"
    assert detect_emotion("😎", default="neutral") == "cool"


# --------------------------------------------------------------------------- properties

# Letters, spaces and ASCII punctuation, except the markdown line markers "#" and "-" (speakable()
# is applied to each sentence, so "That is all. - ok" speaks "ok" for the second sentence where
# speakable() of the whole text keeps the "-") and "'" (a run of lone
# apostrophes counts as a "word" for the length rule but has no speakable content). The text ends
# with a letter: a trailing fragment with no word in it (a lone "?!") is, by design, not spoken.
_SAFE_PUNCT = string.punctuation.replace("#", "").replace("-", "").replace("'", "")
_safe_text = st.builds(
    lambda body, last: body + last,
    st.text(alphabet=string.ascii_letters + " " * 6 + _SAFE_PUNCT, max_size=120),
    st.sampled_from(string.ascii_letters),
)


@settings(max_examples=300, deadline=None)
@given(_safe_text)
def test_no_speakable_character_is_lost(text: str) -> None:
    sentences = by_char(text)
    assert nospace("".join(sentences)) == nospace(speakable(text))
    assert all(s == s.strip() and s for s in sentences)


_any_text = st.text(alphabet=string.ascii_letters + " " * 6 + "\n" + string.punctuation, max_size=120)


@settings(max_examples=300, deadline=None)
@given(_any_text)
def test_no_word_character_is_lost(text: str) -> None:
    """For any letter/space/punctuation text, every word character of speakable(text) is
    spoken, in order (only word-less fragments and line markers may be left out)."""
    sentences = by_char(text)
    assert re.findall(r"\w", " ".join(sentences)) == re.findall(r"\w", speakable(text))
    assert all(re.search(r"\w", s) for s in sentences)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=string.ascii_letters[:6] + "0123 \n.,!?;:'\")-#。！？」，你好", max_size=80),
    st.lists(st.integers(1, 80), max_size=6),
)
def test_chunking_never_changes_the_sentences(text: str, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c < len(text)})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    assert by_chunks(chunks) == by_chunks([text]) == by_char(text)

