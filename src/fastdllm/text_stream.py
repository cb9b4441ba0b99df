"""Final tokens -> text that is safe to show, for every streaming front end (server, chat).

A block-diffusion sequence finalises its tokens left to right, several at a time
(`Sequence.final_ids()`); `TextStream` turns that growing prefix into text deltas:

- it decodes the whole final prefix and emits only the new suffix, so multi-byte characters
  split over tokens are never cut: a trailing U+FFFD (an incomplete character) is held back
  until the next token completes it or the sequence ends;
- it cuts the text at the first stop string, holding back the last `len(stop) - 1` characters
  while a stop string could still be starting there.

The concatenation of the deltas is, by construction, the non-streamed text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .engine.sequence import Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, detokenize: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.detokenize = detokenize
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything sent so far
        self.stopped = False  # a stop string was found; `text` ends right before it
        self._final_len = 0  # seq.final_len at the last feed()
        self.stop_tokens: int | None = None  # once stopped: how many tokens the sent text needs

    def feed(self, seq: Sequence) -> str:
        """`update` from a decoding sequence, called after each engine step. A step that made
        no token final (most refinement steps) sends nothing, so it skips copying the final
        tokens off the device and detokenising them again."""
        if seq.final_len == self._final_len and not seq.finished:
            return ""
        self._final_len = seq.final_len
        return self.update(seq.final_ids(), seq.finished)

    def update(self, final_ids: list[int], finished: bool) -> str:
        """The new text to send, given every final token so far. After a stop string is found
        (`self.stopped`), nothing more is ever sent."""
        if self.stopped:
            return ""
        full = self.detokenize(final_ids)
        if not finished:
            full = full.rstrip(REPLACEMENT)
        if not full.startswith(self.text):
            # decoding a longer prefix rewrote text already sent (a tokenizer whose decode is
            # not prefix-stable); sent text is never retracted, so keep it and go on
            full = self.text + full[len(self.text):]
        cut = self._find_stop(full)
        if cut is not None:
            self.stopped = True
            full = full[:cut]
            self.stop_tokens = self._tokens_covering(final_ids, full)
        elif not finished and self.hold:
            full = full[:max(len(self.text), len(full) - self.hold)]
        delta = full[len(self.text):]
        self.text = full
        return delta

    def tokens_shown(self, final_ids: list[int]) -> int:
        """How many of the final tokens the text sent so far shows: all of them, unless a stop
        string cut the text or may still be starting in the held-back tail."""
        if self.stopped:
            return self.stop_tokens
        return self._tokens_covering(final_ids, self.text) if self.hold else len(final_ids)

    def _tokens_covering(self, ids: list[int], text: str) -> int:
        """The fewest leading tokens of `ids` whose text holds `text` (what a stopped request
        reports as its completion tokens: the ones it shows, not those decoded past the stop).
        Binary search: a longer prefix never decodes to shorter text."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.detokenize(ids[:mid]).rstrip(REPLACEMENT)) >= len(text):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _find_stop(self, full: str) -> int | None:
        # a stop string can only end in the unsent part; start where it could begin
        start = max(0, len(self.text) - self.hold)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
