"""The draft backend interface: every edge backend drafts the same way and returns the same data."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.sampling import SamplingParams


@dataclass
class Proposal:
    """Drafted tokens and, for sampled sessions, the exact sparse distribution per position."""

    token_ids: list[int]
    support_sizes: list[int] = field(default_factory=list)  # empty for greedy
    support_ids: list[np.ndarray] = field(default_factory=list)  # per position, uint32
    support_probs: list[np.ndarray] = field(default_factory=list)  # per position, float32

    def wire_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ids = np.asarray(self.token_ids, dtype=np.uint32)
        sizes = np.asarray(self.support_sizes, dtype=np.uint16)
        if not self.support_ids:
            return ids, sizes, np.zeros(0, np.uint32), np.zeros(0, np.float32)
        return ids, sizes, np.concatenate(self.support_ids), np.concatenate(self.support_probs)


class DraftState:
    """Per-session backend state (typically a KV cache and the tokens it covers)."""


class DraftBackend(ABC):
    """A draft model that proposes tokens with a per-session cache it can roll back."""

    name: str
    device: str  # the device actually used, never just the one asked for
    vocab_size: int
    fingerprint: str  # vocabulary fingerprint, checked against the target's
    model_name: str
    tokenizer: Any  # a transformers tokenizer: prompts are encoded on the edge, ids travel
    eos_token_ids: frozenset[int]

    @abstractmethod
    def new_state(self) -> DraftState: ...

    @abstractmethod
    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int) -> Proposal:
        """Draft up to ``gamma`` tokens after ``context`` (stopping early at a stop token).

        Rolls the state back to the longest prefix it shares with ``context`` first, so a
        rejected suffix from the previous round is discarded.
        """

    def release(self, state: DraftState) -> None:  # noqa: B027 - optional hook
        """Free what a finished session held."""
