"""Turn assembly and fencing for one session, as a pure state machine.

Stages publish a turn's events and audio frames on ``xz.out.<S>``; sentences may be synthesised
by different TTS workers and arrive interleaved or out of order. The assembler turns them into
the exact order the device needs:

    stt -> tts start -> llm (emotion) -> sentence_start -> frames -> ... -> tts stop

It reorders sentences by ``seq`` and frames by index, and drops everything of a stale turn (one
that was aborted or superseded by a newer turn), so late frames never reach the speaker.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shared.messages import OutEvent


@dataclass(frozen=True)
class Text:
    """Send this JSON text frame now (it costs no play-out time)."""

    kind: str  # stt | tts_start | emotion | sentence_start
    text: str = ""
    emotion: str = ""


@dataclass(frozen=True)
class Audio:
    """Send this Opus frame, paced."""

    opus: bytes


@dataclass(frozen=True)
class Stop:
    """The reply is complete: send `tts stop` once the device has played everything."""

    turn_id: str
    close_after: bool = False


@dataclass(frozen=True)
class Flush:
    """Drop everything queued for the device (a newer turn replaces the one playing)."""

    turn_id: str


Action = Text | Audio | Stop | Flush


@dataclass
class _Sentence:
    text: str | None = None
    frames: dict[int, bytes] = field(default_factory=dict)
    total: int | None = None  # known once sentence_end arrives
    started: bool = False
    next_index: int = 0


@dataclass
class _Turn:
    turn_id: str
    stt: str | None = None
    started: bool = False
    emotion: str | None = None
    emotion_sent: bool = False
    sentences: dict[int, _Sentence] = field(default_factory=dict)
    next_seq: int = 0
    expected: int | None = None  # number of sentences, known at turn_end
    close_after: bool = False
    failed: bool = False
    done: bool = False
    buffered_frames: int = 0


class TurnAssembler:
    """Orders one session's downlink and fences stale turns."""

    def __init__(self, max_pending_turns: int = 4, max_frames_per_turn: int = 20000, stale_memory: int = 64) -> None:
        self.current: _Turn | None = None
        self._pending: OrderedDict[str, _Turn] = OrderedDict()
        self._stale: OrderedDict[str, None] = OrderedDict()
        self.max_pending_turns = max_pending_turns
        self.max_frames_per_turn = max_frames_per_turn
        self.stale_memory = stale_memory
        self.dropped = 0  # events and frames dropped because their turn is stale

    # ------------------------------------------------------------------ queries

    @property
    def current_turn_id(self) -> str | None:
        return self.current.turn_id if self.current and not self.current.done else None

    @property
    def speaking(self) -> bool:
        """True while a reply has been started (`tts start` sent) and not yet stopped."""
        return bool(self.current and self.current.started and not self.current.done)

    def is_stale(self, turn_id: str) -> bool:
        return turn_id in self._stale

    # ------------------------------------------------------------------ inputs

    def discard(self, turn_id: str) -> None:
        """Drop turn ``turn_id`` before it plays (refused by a rate limit): whatever comes for
        it later is stale."""
        if self.current is not None and self.current.turn_id == turn_id:
            return
        self._mark_stale(turn_id)

    def begin_text_turn(self, turn_id: str) -> None:
        """The gateway itself created this turn (typed text); the LLM will echo its stt."""
        self._turn(turn_id)

    def begin_local_turn(self, turn_id: str, sentences: int | None = None, emotion: str | None = None) -> list[Action]:
        """A turn with no user text (wake-word greeting, idle farewell): it starts at once.

        ``sentences``, when known, ends the turn after that many; ``emotion`` is sent first.
        """
        turn = self._turn(turn_id)
        if turn is None:
            return []
        if sentences is not None:
            turn.expected = sentences
        if emotion is not None:
            turn.emotion = emotion
        return self._make_current(turn) + [Text("tts_start")] + self._drain(turn)

    def on_event(self, event: OutEvent) -> list[Action]:
        turn = self._turn(event.turn_id)
        if turn is None:
            return []
        actions: list[Action] = []
        if event.kind == "stt":
            turn.stt = event.text
            actions += self._activate(turn)
        elif event.kind == "emotion":
            if turn.emotion is None:
                turn.emotion = event.emotion or "happy"
        elif event.kind in ("sentence_start", "sentence_end") and event.seq < turn.next_seq:
            # A sentence already played, synthesised again (its TTS worker died): ignore it.
            self.dropped += 1
        elif event.kind == "sentence_start":
            sentence = turn.sentences.setdefault(event.seq, _Sentence())
            sentence.text = event.text
        elif event.kind == "sentence_end":
            sentence = turn.sentences.setdefault(event.seq, _Sentence())
            sentence.total = event.frames
            if sentence.text is None:
                sentence.text = event.text
        elif event.kind == "turn_end":
            turn.expected = event.sentences
            turn.close_after = event.close_after
        elif event.kind == "error":
            turn.failed = True
            if turn.expected is None:
                turn.expected = turn.next_seq
        if turn is self.current:
            actions += self._drain(turn)
        return actions

    def on_audio(self, turn_id: str, seq: int, index: int, opus: bytes) -> list[Action]:
        turn = self._turn(turn_id)
        if turn is None:
            return []
        if turn.buffered_frames >= self.max_frames_per_turn:
            self.dropped += 1
            return []
        if seq < turn.next_seq:
            self.dropped += 1  # a sentence already played, redelivered
            return []
        sentence = turn.sentences.setdefault(seq, _Sentence())
        if index < sentence.next_index or index in sentence.frames:
            self.dropped += 1  # duplicate
            return []
        sentence.frames[index] = opus
        turn.buffered_frames += 1
        if turn is self.current:
            return self._drain(turn)
        return []

    def abort(self) -> tuple[str | None, bool]:
        """Abort the current turn. Returns (its id, whether `tts start` had been sent)."""
        turn = self.current
        if turn is None or turn.done:
            return None, False
        self._mark_stale(turn.turn_id)
        was_started = turn.started
        turn.done = True
        self.current = None
        return turn.turn_id, was_started

    def timeout(self) -> list[Action]:
        """The current turn went quiet for too long: end it as it stands."""
        turn = self.current
        if turn is None or turn.done:
            return []
        turn.done = True
        self._mark_stale(turn.turn_id)
        self.current = None
        return [Stop(turn.turn_id)] if turn.started else []

    # ------------------------------------------------------------------ internals

    def _turn(self, turn_id: str) -> _Turn | None:
        if turn_id in self._stale:
            self.dropped += 1
            return None
        if self.current is not None and self.current.turn_id == turn_id:
            if self.current.done:
                self.dropped += 1
                return None
            return self.current
        turn = self._pending.get(turn_id)
        if turn is None:
            turn = _Turn(turn_id)
            self._pending[turn_id] = turn
            while len(self._pending) > self.max_pending_turns:
                old_id, _ = self._pending.popitem(last=False)
                self._mark_stale(old_id)
        return turn

    def _activate(self, turn: _Turn) -> list[Action]:
        """The turn's stt arrived: it becomes the current turn, superseding any other."""
        if turn is self.current:
            return []
        return self._make_current(turn) + [Text("stt", text=turn.stt or ""), Text("tts_start")]

    def _make_current(self, turn: _Turn) -> list[Action]:
        """``turn`` starts playing; a turn still playing is superseded (stale, flushed)."""
        actions: list[Action] = []
        previous = self.current
        if previous is not None and previous is not turn and not previous.done:
            previous.done = True
            self._mark_stale(previous.turn_id)
            actions.append(Flush(previous.turn_id))
        self._pending.pop(turn.turn_id, None)
        self.current = turn
        turn.started = True
        return actions

    def _drain(self, turn: _Turn) -> list[Action]:
        actions: list[Action] = []
        if not turn.started or turn.done:
            return actions
        if not turn.emotion_sent:
            if turn.emotion is None and turn.expected is None:
                return actions  # hold sentences until the emotion, to keep the order
            turn.emotion_sent = True
            if turn.emotion is not None:
                actions.append(Text("emotion", emotion=turn.emotion))
        while True:
            sentence = turn.sentences.get(turn.next_seq)
            if sentence is None:
                break
            if not sentence.started:
                if sentence.text is None:
                    break
                sentence.started = True
                if sentence.text:
                    actions.append(Text("sentence_start", text=sentence.text))
            while sentence.next_index in sentence.frames:
                actions.append(Audio(sentence.frames.pop(sentence.next_index)))
                sentence.next_index += 1
            if sentence.total is not None and sentence.next_index >= sentence.total:
                del turn.sentences[turn.next_seq]
                turn.next_seq += 1
                continue
            break
        if turn.expected is not None and turn.next_seq >= turn.expected:
            turn.done = True
            self._mark_stale(turn.turn_id)
            actions.append(Stop(turn.turn_id, close_after=turn.close_after))
        return actions

    def _mark_stale(self, turn_id: str) -> None:
        self._pending.pop(turn_id, None)
        self._stale[turn_id] = None
        while len(self._stale) > self.stale_memory:
            self._stale.popitem(last=False)
