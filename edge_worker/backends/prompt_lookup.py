"""Prompt-lookup drafting: propose what followed the latest earlier copy of the context's tail.

Summaries, retrieval answers and code edits repeat their input. This backend looks for the
longest suffix n-gram of the session's context (prompt and generated text, ``max_ngram`` down to
``min_ngram`` tokens) that occurred earlier in the context, and proposes the tokens that
followed its most recent earlier occurrence (as transformers' ``prompt_lookup_num_tokens`` and
vLLM's n-gram speculator do). It runs no model, so the smallest edge device can speculate.

Exactness: greedy verification needs no distribution. In a sampled session each proposed token
is sent with a one-hot q (support size 1, probability 1): the token is a draw from that q, so
the verifier's rejection sampling (accept with min(1, p/q) = p(token), else resample from the
residual max(0, p - q)) still yields exactly the target's distribution.

With a ``fallback`` backend (a model draft sharing the vocabulary) the n-gram proposal is used
when a match exists and the model drafts otherwise; the fallback's own state rolls back to
whatever context it is given next, so the rounds it sat out cost one catch-up forward.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.sampling import SamplingParams
from edge_worker.backends.base import DraftBackend, DraftState, Proposal, cut_options

NO_GUESS = -1
"""``guess_next`` without a match and without a fallback: never equals a real token."""


@dataclass
class LookupState(DraftState):
    fallback: DraftState | None = None  # the model draft's state, when there is one
    lookup_rounds: int = 0  # proposals made from an n-gram match
    model_rounds: int = 0  # proposals left to the fallback
    empty_rounds: int = 0  # no match, no fallback: nothing drafted
    extra: dict[str, Any] = field(default_factory=dict)


def find_continuation(context: list[int] | np.ndarray, gamma: int, max_ngram: int = 3,
                      min_ngram: int = 1) -> list[int]:
    """Up to ``gamma`` tokens that followed the latest earlier copy of the longest suffix n-gram.

    Pure function of the context: the same context always gives the same proposal.
    """
    tokens = np.asarray(context, dtype=np.int64)
    size = tokens.size
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        if n < 1:
            break
        pattern = tokens[size - n:]
        # windows starting at 0 .. size - n - 1: every earlier occurrence, the suffix excluded
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:size - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + gamma].tolist()
    return []


class PromptLookupBackend(DraftBackend):
    """n-gram prompt lookup, optionally beside a model draft used when no n-gram matches."""

    name = "prompt_lookup"

    def __init__(self, tokenizer: Any, fingerprint: str, vocab_size: int, model_name: str,
                 eos_token_ids: frozenset[int], *, max_ngram: int = 3, min_ngram: int = 1,
                 fallback: DraftBackend | None = None) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.fallback = fallback
        self.device = fallback.device if fallback is not None else "none"
        self.wants_features = fallback is not None and fallback.wants_features
        self.model_name = (f"prompt_lookup+{fallback.model_name}" if fallback is not None
                           else f"prompt_lookup:{model_name}")

    @classmethod
    def from_tokenizer(cls, model: str, trust_remote_code: bool = False,
                       **options: Any) -> PromptLookupBackend:
        """No model: only ``model``'s tokenizer (the vocabulary the target must share)."""
        from common.models import load_tokenizer, vocab_fingerprint

        tokenizer = load_tokenizer(model, trust_remote_code)
        eos = frozenset({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        return cls(tokenizer, vocab_fingerprint(tokenizer), len(tokenizer), model, eos, **options)

    @classmethod
    def beside(cls, model: DraftBackend, **options: Any) -> PromptLookupBackend:
        """Prompt lookup first, ``model`` when there is no match (same vocabulary by construction)."""
        return cls(model.tokenizer, model.fingerprint, model.vocab_size, model.model_name,
                   model.eos_token_ids, fallback=model, **options)

    def new_state(self) -> LookupState:
        return LookupState(fallback=self.fallback.new_state() if self.fallback is not None else None)

    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None, *, min_confidence: float = 0.0,
                open_confidence: float = 0.0) -> Proposal:
        """An n-gram match has no probabilities: ``min_confidence`` and ``open_confidence`` apply to
        the fallback only."""
        assert isinstance(state, LookupState)
        if gamma == 0:
            return Proposal(token_ids=[])
        tokens = find_continuation(context, gamma, self.max_ngram, self.min_ngram)
        if not tokens and self.fallback is not None and state.fallback is not None:
            state.model_rounds += 1
            return self.fallback.propose(state.fallback, context, gamma, params, seq, stop_token_ids,
                                         max_support, cancel, **cut_options(self.fallback, min_confidence,
                                                                   open_confidence))
        if tokens:
            state.lookup_rounds += 1
        else:
            state.empty_rounds += 1
        return one_hot_proposal(_until_stop(tokens, stop_token_ids), params)

    def observe(self, state: DraftState, feature: bytes, committed: int) -> None:
        assert isinstance(state, LookupState)
        if self.fallback is not None and state.fallback is not None:
            self.fallback.observe(state.fallback, feature, committed)

    def guess_next(self, state: DraftState, context: list[int]) -> int:
        assert isinstance(state, LookupState)
        tokens = find_continuation(context, 1, self.max_ngram, self.min_ngram)
        if tokens:
            return tokens[0]
        if self.fallback is not None and state.fallback is not None:
            return self.fallback.guess_next(state.fallback, context)
        return NO_GUESS

    def release(self, state: DraftState) -> None:
        assert isinstance(state, LookupState)
        if self.fallback is not None and state.fallback is not None:
            self.fallback.release(state.fallback)


def one_hot_proposal(tokens: list[int], params: SamplingParams) -> Proposal:
    """``tokens`` as a proposal; sampled sessions get q = 1 on each token (see the module doc)."""
    proposal = Proposal(token_ids=list(tokens))
    if not params.greedy:
        for token in tokens:
            proposal.support_sizes.append(1)
            proposal.support_ids.append(np.asarray([token], dtype=np.uint32))
            proposal.support_probs.append(np.ones(1, dtype=np.float32))
    return proposal


def _until_stop(tokens: list[int], stop_token_ids: frozenset[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stop_token_ids:
            return tokens[:index + 1]
    return tokens
