"""A transcript that is the wake word alone holds no question (asr_svc.service.only_wake_word)."""

from asr_svc.service import only_wake_word


def test_the_wake_word_alone_once_or_repeated() -> None:
    assert only_wake_word("你好小智。", "你好小智")
    assert only_wake_word("你好小智。你好小智！", "你好小智")
    assert only_wake_word("Hey, Xiaozhi.", "hey xiaozhi")
    assert only_wake_word("你好小智 Thank you.", "你好小智")  # a hallucinated tail is noise


def test_a_question_after_the_wake_word_is_kept() -> None:
    assert not only_wake_word("你好小智，现在几点了？", "你好小智")
    assert not only_wake_word("Hey Xiaozhi, what time is it?", "Hey Xiaozhi")
    assert not only_wake_word("你好", "你好小智")  # not the wake word: the words stand


def test_no_wake_word_known() -> None:
    assert not only_wake_word("你好小智", "")
    assert not only_wake_word("你好小智", "，")
