"""Prompt ids per turn: a question's turns run as a conversation, each mode with its own replies.

With a chat template the conversation is rendered by the tokenizer; without one (the bundled pair)
the turns are joined plainly: turn 1, the reply, a blank line, turn 2, ... A context longer than
the model's window less ``max_new_tokens`` keeps its head and tail (the instruction and the
question usually sit at the ends) and the record says how many tokens were cut.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

TURN_SEPARATOR = "\n\n"


@dataclass
class TurnOutput:
    """One generation: the new tokens, its wall time and the mode's counters."""

    token_ids: list[int]
    wall_ms: float
    stats: dict[str, float] = field(default_factory=dict)


Generate = Callable[[list[int]], Awaitable[TurnOutput]]


@dataclass
class Dialogue:
    """The result of running all turns of one question in one mode."""

    prompt_ids: list[int]  # the first turn's prompt, as sent
    turns: list[TurnOutput]
    truncated_tokens: int = 0


class Conversation:
    def __init__(self, tokenizer: Any, context_limit: int, max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.budget = max(16, context_limit - max_new_tokens)
        self.template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, turns: tuple[str, ...], replies: list[list[int]]) -> list[int]:
        """The context for the next turn, given the replies so far (uncut)."""
        if self.template:
            messages: list[dict[str, str]] = []
            for i, turn in enumerate(turns[: len(replies) + 1]):
                messages.append({"role": "user", "content": turn})
                if i < len(replies):
                    messages.append({"role": "assistant", "content": self._text(replies[i])})
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
            return list(self.tokenizer.encode(rendered, add_special_tokens=False))
        ids = list(self.tokenizer.encode(turns[0]))
        for i, reply in enumerate(replies):
            ids += reply + list(self.tokenizer.encode(TURN_SEPARATOR + turns[i + 1],
                                                      add_special_tokens=False))
        return ids

    def fit(self, ids: list[int]) -> tuple[list[int], int]:
        """``ids`` cut to the window (head quarter + tail), and how many tokens were dropped."""
        if len(ids) <= self.budget:
            return ids, 0
        head = self.budget // 4
        tail = self.budget - head
        return ids[:head] + ids[-tail:], len(ids) - self.budget

    async def run(self, turns: tuple[str, ...], generate: Generate) -> Dialogue:
        replies: list[list[int]] = []
        outputs: list[TurnOutput] = []
        first: list[int] = []
        cut = 0
        for _ in turns:
            ids, dropped = self.fit(self.prompt_ids(turns, replies))
            first = first or ids
            cut += dropped
            out = await generate(ids)
            outputs.append(out)
            replies.append(out.token_ids)
        return Dialogue(first, outputs, cut)

    def _text(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def texts(self, dialogue: Dialogue) -> list[str]:
        return [self._text(turn.token_ids) for turn in dialogue.turns]
