"""Token rounds -> text deltas: incremental detokenisation, stop strings, draft/target spans.

Each verified round commits ``drafted[:accepted] + [verifier token]``; the text of the accepted
draft tokens and of the verifier's token (its correction, or the bonus token) become separate
spans so the web page can show them apart. The whole token list is decoded each round (a
multi-byte character may span tokens); text is held back while it ends in an incomplete
character or could still be the start of a stop string.

Tokens are released with the text (for per-token logprobs): a round's tokens once all of its
text is out; at a stop string, the tokens whose text starts before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Span = tuple[str, str]  # (text, "draft" | "target")


@dataclass
class Delta:
    text: str
    spans: list[Span]
    tokens: int = field(default=0, compare=False)  # tokens released with this text (and logprobs)


@dataclass
class TextStream:
    tokenizer: Any
    stops: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already handed out
    stopped: bool = False  # a stop string was found: the text ends before it
    released: int = 0  # tokens handed out (with the text they make)
    _marks: list[tuple[int, str]] = field(default_factory=list)  # (end char, source) per span
    _rounds: list[tuple[int, int]] = field(default_factory=list)  # (end char, tokens so far) per round
    _text: str = ""

    def push(self, tokens: list[int], accepted: int) -> Delta:
        """A round's committed tokens, the first ``accepted`` of them drafted ones."""
        accepted = max(0, min(accepted, len(tokens)))
        if accepted:
            self._extend(tokens[:accepted], "draft")
        if tokens[accepted:]:
            self._extend(tokens[accepted:], "target")
        self._rounds.append((len(self._text), len(self.ids)))
        return self._release(final=False)

    def finish(self) -> Delta:
        """Whatever is left once the session ended (a held-back partial stop string included)."""
        return self._release(final=True)

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self._text[: self.emitted]

    def _extend(self, tokens: list[int], source: str) -> None:
        self.ids.extend(tokens)
        self._text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._marks.append((len(self._text), source))

    def _release(self, final: bool) -> Delta:
        if self.stopped:
            return Delta("", [])
        end = len(self._text)
        cut = self._find_stop()
        if cut is not None:
            end, self.stopped = cut, True
        elif not final:
            end = self._safe_end()
        tokens = self._tokens_before(cut) if cut is not None else (
            len(self.ids) if final else self._tokens_within(max(end, self.emitted)))
        fresh, self.released = max(0, tokens - self.released), max(tokens, self.released)
        if end <= self.emitted:
            return Delta("", [], fresh)
        delta = Delta(self._text[self.emitted:end], self._spans(self.emitted, end), fresh)
        self.emitted = end
        return delta

    def _tokens_within(self, end: int) -> int:
        """Tokens of the rounds whose whole text lies within the first ``end`` characters."""
        return max((count for round_end, count in self._rounds if round_end <= end), default=0)

    def _tokens_before(self, cut: int) -> int:
        """Tokens whose text starts before ``cut`` (decoded one prefix at a time in the cut's round)."""
        count = self._tokens_within(cut)
        while count < len(self.ids):
            start = len(self.tokenizer.decode(self.ids[:count], skip_special_tokens=True))
            if start >= cut:
                break
            count += 1
        return count

    def _find_stop(self) -> int | None:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.emitted - longest + 1)
        found = [i for i in (self._text.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        """The end of the text that can be handed out now."""
        end = len(self._text)
        while end > self.emitted and self._text[end - 1] == "\ufffd":  # an incomplete character
            end -= 1
        for stop in self.stops:  # a suffix that may grow into a stop string
            for size in range(min(len(stop) - 1, end - self.emitted), 0, -1):
                if self._text[end - size:end] == stop[:size]:
                    end -= size
                    break
        return end

    def _spans(self, begin: int, end: int) -> list[Span]:
        spans: list[Span] = []
        previous = 0
        for mark, source in self._marks:
            lo, hi = max(begin, previous), min(end, mark)
            if hi > lo:
                spans.append((self._text[lo:hi], source))
            previous = max(previous, mark)
        return spans
