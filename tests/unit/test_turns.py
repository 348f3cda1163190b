"""gateway.turns.TurnAssembler: ordering and fencing of one session's downlink."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.turns import Audio, Flush, Stop, Text, TurnAssembler
from shared.messages import OutEvent

S = "sess"


def ev(kind: str, turn: str = "t1", **kw) -> OutEvent:
    return OutEvent(kind=kind, session_id=S, turn_id=turn, **kw)


def stt(turn: str = "t1", text: str = "what time is it") -> OutEvent:
    return ev("stt", turn, text=text)


def emotion(turn: str = "t1", name: str = "happy") -> OutEvent:
    return ev("emotion", turn, emotion=name)


def s_start(seq: int, text: str, turn: str = "t1") -> OutEvent:
    return ev("sentence_start", turn, seq=seq, text=text)


def s_end(seq: int, frames: int, turn: str = "t1") -> OutEvent:
    return ev("sentence_end", turn, seq=seq, frames=frames)


def turn_end(sentences: int, turn: str = "t1", close_after: bool = False) -> OutEvent:
    return ev("turn_end", turn, sentences=sentences, close_after=close_after)


def frame(seq: int, index: int) -> bytes:
    return f"opus-{seq}-{index}".encode()


def kinds(actions) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Text):
            out.append(a.kind)
        elif isinstance(a, Audio):
            out.append("audio")
        elif isinstance(a, Stop):
            out.append("stop")
        elif isinstance(a, Flush):
            out.append("flush")
    return out


class Feed:
    """Collects every action the assembler produces."""

    def __init__(self, asm: TurnAssembler | None = None) -> None:
        self.asm = asm or TurnAssembler()
        self.actions: list = []

    def event(self, e: OutEvent) -> list:
        got = self.asm.on_event(e)
        self.actions += got
        return got

    def audio(self, seq: int, index: int, turn: str = "t1", opus: bytes | None = None) -> list:
        got = self.asm.on_audio(turn, seq, index, opus if opus is not None else frame(seq, index))
        self.actions += got
        return got

    def sentence(self, seq: int, text: str, n: int, turn: str = "t1") -> None:
        self.event(s_start(seq, text, turn))
        for i in range(n):
            self.audio(seq, i, turn)
        self.event(s_end(seq, n, turn))


def expected_turn(sentences: list[tuple[str, int]], emotion_name: str = "happy", stt_text: str = "what time is it", close_after: bool = False, turn: str = "t1") -> list:
    out: list = [Text("stt", text=stt_text), Text("tts_start"), Text("emotion", emotion=emotion_name)]
    for seq, (text, n) in enumerate(sentences):
        out.append(Text("sentence_start", text=text))
        out += [Audio(frame(seq, i)) for i in range(n)]
    out.append(Stop(turn, close_after=close_after))
    return out


# --------------------------------------------------------------------------- the happy path


def test_exact_order_in_order_input() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.sentence(0, "It is noon.", 3)
    f.sentence(1, "Anything else?", 2)
    f.event(turn_end(2))
    assert f.actions == expected_turn([("It is noon.", 3), ("Anything else?", 2)])
    assert kinds(f.actions) == [
        "stt", "tts_start", "emotion",
        "sentence_start", "audio", "audio", "audio",
        "sentence_start", "audio", "audio",
        "stop",
    ]  # fmt: skip
    assert f.asm.current_turn_id is None
    assert not f.asm.speaking
    assert f.asm.dropped == 0


def test_stt_opens_the_turn_immediately() -> None:
    asm = TurnAssembler()
    assert asm.on_event(stt(text="hi")) == [Text("stt", text="hi"), Text("tts_start")]
    assert asm.current_turn_id == "t1"
    assert asm.speaking


def test_audio_streams_as_it_arrives() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion(name="sad"))
    assert f.event(s_start(0, "Hello.")) == [Text("sentence_start", text="Hello.")]
    assert f.audio(0, 0) == [Audio(frame(0, 0))]
    assert f.audio(0, 1) == [Audio(frame(0, 1))]
    assert f.event(s_end(0, 2)) == []
    assert f.event(turn_end(1)) == [Stop("t1")]
    assert f.actions[2] == Text("emotion", emotion="sad")


def test_empty_emotion_becomes_happy_and_only_the_first_counts() -> None:
    f = Feed()
    f.event(stt())
    f.event(ev("emotion", emotion=""))
    f.event(emotion(name="sad"))
    assert Text("emotion", emotion="happy") in f.actions
    assert Text("emotion", emotion="sad") not in f.actions


# --------------------------------------------------------------------------- reordering


def test_sentences_out_of_order_from_different_workers() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    # worker B finishes sentence 1 before worker A has even started sentence 0
    f.event(s_start(1, "Second."))
    f.audio(1, 0)
    f.audio(1, 1)
    f.event(s_end(1, 2))
    f.event(turn_end(2))
    assert kinds(f.actions) == ["stt", "tts_start", "emotion"]  # sentence 1 held back
    f.event(s_start(0, "First."))
    f.audio(0, 0)
    f.event(s_end(0, 1))
    assert f.actions == expected_turn([("First.", 1), ("Second.", 2)])


def test_interleaved_sentences() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "A."))
    f.event(s_start(1, "B."))
    f.audio(1, 0)
    f.audio(0, 0)
    f.audio(1, 1)
    f.audio(0, 1)
    f.event(s_end(1, 2))
    f.event(s_end(0, 2))
    f.event(turn_end(2))
    assert f.actions == expected_turn([("A.", 2), ("B.", 2)])


def test_frames_out_of_order_within_a_sentence() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "Hi."))
    assert f.audio(0, 2) == []
    assert f.audio(0, 1) == []
    assert f.audio(0, 0) == [Audio(frame(0, 0)), Audio(frame(0, 1)), Audio(frame(0, 2))]
    f.audio(0, 4)
    f.audio(0, 3)
    f.event(s_end(0, 5))
    f.event(turn_end(1))
    assert f.actions == expected_turn([("Hi.", 5)])


def test_frames_before_their_sentence_start() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.audio(0, 0)
    f.audio(0, 1)
    assert kinds(f.actions) == ["stt", "tts_start", "emotion"]
    f.event(s_start(0, "Late header."))
    f.event(s_end(0, 2))
    f.event(turn_end(1))
    assert f.actions == expected_turn([("Late header.", 2)])


def test_sentence_end_before_its_last_frames() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "A."))
    f.event(s_end(0, 3))
    f.event(s_start(1, "B."))
    f.audio(1, 0)
    f.event(s_end(1, 1))
    f.event(turn_end(2))
    assert Stop("t1") not in f.actions
    for i in range(3):
        f.audio(0, i)
    assert f.actions == expected_turn([("A.", 3), ("B.", 1)])


def test_sentence_without_frames_is_skipped() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "Broken."))
    f.event(s_end(0, 0))  # a failed synthesis still closes its sentence
    f.sentence(1, "Fine.", 1)
    f.event(turn_end(2))
    assert f.actions == [
        Text("stt", text="what time is it"),
        Text("tts_start"),
        Text("emotion", emotion="happy"),
        Text("sentence_start", text="Broken."),
        Text("sentence_start", text="Fine."),
        Audio(frame(1, 0)),
        Stop("t1"),
    ]


def test_sentence_end_alone_supplies_the_text() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.audio(0, 0)
    f.event(ev("sentence_end", seq=0, frames=1, text="From the end."))
    f.event(turn_end(1))
    assert f.actions == expected_turn([("From the end.", 1)])


def test_empty_sentence_text_sends_no_sentence_start() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.sentence(0, "", 1)
    f.event(turn_end(1))
    assert kinds(f.actions) == ["stt", "tts_start", "emotion", "audio", "stop"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=4),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_any_interleaving_of_publishers_gives_the_same_output(
    frame_counts: list[int], rnd: random.Random, shuffle_frames: bool
) -> None:
    """Each publisher's messages arrive in the order it sent them (NATS keeps per-connection
    order): the LLM sends stt, emotion, turn_end; each TTS job sends sentence_start, its frames,
    sentence_end. The streams interleave arbitrarily, and frames may even be reordered within
    their sentence. The device-facing output never changes."""
    texts = [f"Sentence {i}." for i in range(len(frame_counts))]
    streams: list[list] = [[stt(), emotion(), turn_end(len(frame_counts))]]
    for seq, n in enumerate(frame_counts):
        frames = [("audio", seq, i) for i in range(n)]
        if shuffle_frames:
            rnd.shuffle(frames)
        streams.append([s_start(seq, texts[seq]), *frames, s_end(seq, n)])
    f = Feed()
    while streams:
        stream = rnd.choice(streams)
        m = stream.pop(0)
        if not stream:
            streams.remove(stream)
        if isinstance(m, tuple):
            f.audio(m[1], m[2])
        else:
            f.event(m)
    assert f.actions == expected_turn(list(zip(texts, frame_counts)))
    assert f.asm.dropped == 0


# --------------------------------------------------------------------------- buffering before stt / emotion


def test_events_before_stt_are_buffered_and_released_on_stt() -> None:
    f = Feed()
    assert f.event(emotion()) == []
    assert f.event(s_start(0, "Early.")) == []
    assert f.audio(0, 0) == []
    assert f.audio(0, 1) == []
    assert f.event(s_end(0, 2)) == []
    assert f.event(turn_end(1)) == []
    assert f.asm.current_turn_id is None
    assert not f.asm.speaking
    released = f.event(stt())
    assert released == expected_turn([("Early.", 2)])


def test_sentences_are_held_until_the_emotion() -> None:
    f = Feed()
    f.event(stt())
    assert f.event(s_start(0, "Wait for it.")) == []
    assert f.audio(0, 0) == []
    got = f.event(emotion(name="thinking"))
    assert got == [
        Text("emotion", emotion="thinking"),
        Text("sentence_start", text="Wait for it."),
        Audio(frame(0, 0)),
    ]


def test_turn_end_releases_sentences_without_an_emotion() -> None:
    f = Feed()
    f.event(stt())
    f.sentence(0, "No emotion.", 1)
    assert kinds(f.actions) == ["stt", "tts_start"]
    got = f.event(turn_end(1))
    assert got == [Text("sentence_start", text="No emotion."), Audio(frame(0, 0)), Stop("t1")]
    assert not any(isinstance(a, Text) and a.kind == "emotion" for a in f.actions)


def test_turn_with_no_sentences() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    assert f.event(turn_end(0)) == [Stop("t1")]


def test_begin_text_turn_registers_a_pending_turn() -> None:
    asm = TurnAssembler()
    asm.begin_text_turn("typed")
    assert asm.current_turn_id is None
    assert asm.on_event(emotion("typed")) == []
    assert asm.on_event(stt("typed", "hello")) == [
        Text("stt", text="hello"),
        Text("tts_start"),
        Text("emotion", emotion="happy"),
    ]


# --------------------------------------------------------------------------- close_after / error / timeout


def test_close_after_is_carried_to_stop() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.sentence(0, "Goodbye.", 1)
    got = f.event(turn_end(1, close_after=True))
    assert got == [Stop("t1", close_after=True)]


def test_close_after_waits_for_missing_sentences() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    assert f.event(turn_end(1, close_after=True)) == []
    f.sentence(0, "Bye.", 1)
    assert f.actions[-1] == Stop("t1", close_after=True)


def test_error_ends_the_turn() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.sentence(0, "Partial.", 1)
    got = f.event(ev("error", text="llm failed"))
    assert got == [Stop("t1")]
    assert f.asm.current_turn_id is None
    # anything else of that turn is stale now
    assert f.event(s_start(1, "Too late.")) == []
    assert f.audio(1, 0) == []
    assert f.asm.dropped == 2


def test_error_without_emotion_or_sentences_still_stops() -> None:
    f = Feed()
    f.event(stt())
    assert f.event(ev("error")) == [Stop("t1")]
    assert kinds(f.actions) == ["stt", "tts_start", "stop"]


def test_error_mid_sentence_stops_after_the_frames_so_far() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "Cut off"))
    f.audio(0, 0)
    assert f.event(ev("error")) == [Stop("t1")]
    assert f.audio(0, 1) == []


def test_error_before_stt_ends_the_turn_as_soon_as_it_opens() -> None:
    f = Feed()
    f.event(ev("error"))
    assert f.event(stt()) == [Text("stt", text="what time is it"), Text("tts_start"), Stop("t1")]


def test_timeout_stops_a_started_turn() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "Hanging"))
    f.audio(0, 0)
    assert f.asm.timeout() == [Stop("t1")]
    assert f.asm.current_turn_id is None
    assert f.asm.is_stale("t1")
    assert f.asm.timeout() == []  # nothing current any more
    assert f.audio(0, 1) == []
    assert f.asm.dropped == 1


def test_timeout_without_a_turn() -> None:
    asm = TurnAssembler()
    assert asm.timeout() == []
    asm.on_event(emotion("pending"))  # pending only, never opened
    assert asm.timeout() == []
    assert not asm.is_stale("pending")


# --------------------------------------------------------------------------- abort and superseding


def test_abort_started_turn_and_drop_what_follows() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "Interrupted"))
    f.audio(0, 0)
    assert f.asm.abort() == ("t1", True)
    assert f.asm.current_turn_id is None
    assert not f.asm.speaking
    assert f.asm.is_stale("t1")
    before = list(f.actions)
    assert f.audio(0, 1) == []
    assert f.audio(0, 2) == []
    assert f.event(s_end(0, 3)) == []
    assert f.event(s_start(1, "More")) == []
    assert f.event(turn_end(2)) == []
    assert f.event(stt()) == []  # even a re-sent stt does not resurrect it
    assert f.actions == before
    assert f.asm.dropped == 6


def test_abort_with_nothing_current() -> None:
    asm = TurnAssembler()
    assert asm.abort() == (None, False)
    asm.on_event(emotion())  # pending, not current
    assert asm.abort() == (None, False)


def test_abort_twice() -> None:
    f = Feed()
    f.event(stt())
    assert f.asm.abort() == ("t1", True)
    assert f.asm.abort() == (None, False)


def test_abort_after_the_turn_finished() -> None:
    f = Feed()
    f.event(stt())
    f.event(turn_end(0))
    assert f.asm.abort() == (None, False)


def test_new_turn_after_abort_plays_normally() -> None:
    f = Feed()
    f.event(stt("t1"))
    f.asm.abort()
    f.actions.clear()
    f.event(stt("t2"))
    f.event(emotion("t2"))
    f.sentence(0, "New.", 1, turn="t2")
    f.event(turn_end(1, turn="t2"))
    assert f.actions == expected_turn([("New.", 1)], turn="t2")


def test_newer_turn_supersedes_a_playing_turn() -> None:
    f = Feed()
    f.event(stt("old", "first question"))
    f.event(emotion("old"))
    f.event(s_start(0, "Old answer", "old"))
    f.audio(0, 0, "old")
    got = f.event(stt("new", "second question"))
    assert got[0] == Flush("old")
    assert got[1:] == [Text("stt", text="second question"), Text("tts_start")]
    assert f.asm.current_turn_id == "new"
    assert f.asm.is_stale("old")
    # late output of the old turn never reaches the device
    assert f.audio(0, 1, "old") == []
    assert f.event(turn_end(1, "old")) == []
    assert f.asm.dropped == 2


def test_supersede_releases_the_new_turns_buffered_events() -> None:
    f = Feed()
    f.event(stt("old"))
    # the new turn's output arrives before its stt
    f.event(emotion("new", "cool"))
    f.sentence(0, "Fresh.", 1, turn="new")
    f.event(turn_end(1, "new"))
    got = f.event(stt("new", "q2"))
    assert got == [
        Flush("old"),
        Text("stt", text="q2"),
        Text("tts_start"),
        Text("emotion", emotion="cool"),
        Text("sentence_start", text="Fresh."),
        Audio(frame(0, 0)),
        Stop("new"),
    ]


def test_no_flush_when_the_previous_turn_had_finished() -> None:
    f = Feed()
    f.event(stt("a"))
    f.event(turn_end(0, "a"))
    got = f.event(stt("b"))
    assert Flush("a") not in got
    assert got == [Text("stt", text="what time is it"), Text("tts_start")]


def test_duplicate_stt_of_current_turn_is_ignored() -> None:
    f = Feed()
    f.event(stt())
    assert f.event(stt()) == []
    assert f.asm.current_turn_id == "t1"


def test_events_of_a_finished_turn_are_dropped() -> None:
    f = Feed()
    f.event(stt())
    f.event(turn_end(0))
    assert f.event(emotion()) == []
    assert f.audio(0, 0) == []
    assert f.asm.dropped == 2


# --------------------------------------------------------------------------- duplicates and limits


def test_duplicate_frames_are_dropped() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.event(s_start(0, "Dup."))
    assert f.audio(0, 0) == [Audio(frame(0, 0))]
    assert f.audio(0, 0, opus=b"again") == []  # already played
    assert f.asm.dropped == 1
    assert f.audio(0, 2) == []
    assert f.audio(0, 2, opus=b"again") == []  # already buffered
    assert f.asm.dropped == 2
    f.audio(0, 1)
    f.event(s_end(0, 3))
    f.event(turn_end(1))
    assert f.actions == expected_turn([("Dup.", 3)])


def test_duplicate_frame_of_a_finished_sentence_is_not_replayed() -> None:
    f = Feed()
    f.event(stt())
    f.event(emotion())
    f.sentence(0, "One.", 2)
    f.audio(0, 1, opus=b"late duplicate")
    f.sentence(1, "Two.", 1)
    f.event(turn_end(2))
    assert f.actions == expected_turn([("One.", 2), ("Two.", 1)])


def test_frames_beyond_the_per_turn_limit_are_dropped() -> None:
    asm = TurnAssembler(max_frames_per_turn=3)
    f = Feed(asm)
    f.event(stt())
    f.event(s_start(0, "Long"))
    for i in range(5):
        f.audio(0, i)
    assert asm.dropped == 2
    f.event(emotion())
    assert [a for a in f.actions if isinstance(a, Audio)] == [Audio(frame(0, i)) for i in range(3)]


def test_too_many_pending_turns_evicts_the_oldest() -> None:
    asm = TurnAssembler(max_pending_turns=2)
    asm.on_event(emotion("p1"))
    asm.on_event(emotion("p2"))
    asm.on_event(emotion("p3"))
    assert asm.is_stale("p1")
    assert not asm.is_stale("p2") and not asm.is_stale("p3")
    assert asm.on_event(stt("p1")) == []
    assert asm.on_event(stt("p3"))[0] == Text("stt", text="what time is it")


def test_stale_memory_is_bounded() -> None:
    asm = TurnAssembler(stale_memory=3)
    for i in range(5):
        asm.on_event(stt(f"t{i}"))
        asm.abort()
    assert [asm.is_stale(f"t{i}") for i in range(5)] == [False, False, True, True, True]


# --------------------------------------------------------------------------- local turns (greeting, farewell)


def test_local_turn_starts_without_stt_and_ends_after_its_sentences() -> None:
    f = Feed()
    got = f.asm.begin_local_turn("greet", sentences=1, emotion="happy")
    f.actions += got
    assert got == [Text("tts_start"), Text("emotion", emotion="happy")]
    assert f.asm.current_turn_id == "greet"
    assert f.asm.speaking
    f.sentence(0, "Hello there!", 2, turn="greet")
    assert f.actions == [
        Text("tts_start"),
        Text("emotion", emotion="happy"),
        Text("sentence_start", text="Hello there!"),
        Audio(frame(0, 0)),
        Audio(frame(0, 1)),
        Stop("greet"),
    ]


def test_local_turn_releases_output_that_arrived_first() -> None:
    asm = TurnAssembler()
    asm.on_event(s_start(0, "Cached.", "greet"))
    asm.on_audio("greet", 0, 0, b"x")
    asm.on_event(s_end(0, 1, "greet"))
    assert asm.begin_local_turn("greet", sentences=1, emotion="cool") == [
        Text("tts_start"),
        Text("emotion", emotion="cool"),
        Text("sentence_start", text="Cached."),
        Audio(b"x"),
        Stop("greet"),
    ]


def test_local_turn_without_emotion_waits_for_the_llm() -> None:
    f = Feed()
    f.actions += f.asm.begin_local_turn("bye")
    f.sentence(0, "Goodbye.", 1, turn="bye")
    assert f.actions == [Text("tts_start")]  # held for the emotion
    f.event(emotion("bye", "sad"))
    f.event(turn_end(1, "bye", close_after=True))
    # the LLM echoes an stt for the turn: it is already open, nothing more is sent
    assert f.event(stt("bye", "")) == []
    assert f.actions == [
        Text("tts_start"),
        Text("emotion", emotion="sad"),
        Text("sentence_start", text="Goodbye."),
        Audio(frame(0, 0)),
        Stop("bye", close_after=True),
    ]


def test_local_turn_supersedes_a_playing_turn() -> None:
    f = Feed()
    f.event(stt("t1"))
    got = f.asm.begin_local_turn("greet", sentences=1)
    assert got[0] == Flush("t1")
    assert got[1] == Text("tts_start")
    assert f.asm.is_stale("t1")
    assert f.asm.current_turn_id == "greet"


def test_local_turn_of_a_stale_id_does_nothing() -> None:
    asm = TurnAssembler()
    asm.on_event(stt("t1"))
    asm.abort()
    assert asm.begin_local_turn("t1", sentences=1) == []
    assert asm.current_turn_id is None


# --------------------------------------------------------------------------- redelivered work


def test_a_sentence_synthesised_again_after_a_worker_died_is_not_played_twice() -> None:
    """A TTS worker died after its sentence played (before its ack): the survivor sends the
    same sentence again; the device hears it once, and the next sentence follows."""
    feed = Feed()
    feed.event(stt())
    feed.event(emotion())
    feed.sentence(0, "First.", 2)
    feed.sentence(0, "First.", 2)  # redelivered copy
    feed.sentence(1, "Second.", 1)
    feed.event(turn_end(2))
    assert feed.actions == expected_turn([("First.", 2), ("Second.", 1)])
    assert feed.asm.dropped >= 4


def test_a_sentence_resent_midway_continues_where_the_device_is() -> None:
    """The worker died mid-sentence: the copy's frames already played are dropped, the rest
    continues the sentence."""
    feed = Feed()
    feed.event(stt())
    feed.event(emotion())
    feed.event(s_start(0, "Only."))
    feed.audio(0, 0)
    feed.audio(0, 1)
    # The survivor starts the sentence again from frame 0.
    feed.event(s_start(0, "Only."))
    for i in range(4):
        feed.audio(0, i)
    feed.event(s_end(0, 4))
    feed.event(turn_end(1))
    assert feed.actions == expected_turn([("Only.", 4)])


def test_a_discarded_turn_never_plays() -> None:
    asm = TurnAssembler()
    asm.discard("t9")
    assert asm.on_event(stt("t9")) == []
    assert asm.on_audio("t9", 0, 0, b"x") == []
    assert asm.current_turn_id is None
