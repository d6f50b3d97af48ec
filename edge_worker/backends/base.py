"""The draft backend interface: every edge backend drafts the same way and returns the same data."""

from __future__ import annotations

import functools
import inspect
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.sampling import (
    SamplingParams,
    filter_logits,
    round_generator,
    sample_sparse,
    sparse_draft_distribution,
)


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


GREEDY = SamplingParams()


class DraftBackend(ABC):
    """A draft model that proposes tokens with a per-session cache it can roll back."""

    name: str
    device: str  # the device actually used, never just the one asked for
    vocab_size: int
    fingerprint: str  # vocabulary fingerprint, checked against the target's
    model_name: str
    tokenizer: Any  # a transformers tokenizer: prompts are encoded on the edge, ids travel
    eos_token_ids: frozenset[int]
    wants_features = False  # drafts from the target's features: verdicts must carry them
    standalone = True  # can draft without a target (draft-only generation); feature drafts cannot

    def observe(self, state: DraftState, feature: bytes, committed: int) -> None:  # noqa: B027
        """A verdict's target feature (float16 bytes) for the first ``committed`` context tokens;
        only feature drafts (``wants_features``) use it."""

    @abstractmethod
    def new_state(self) -> DraftState: ...

    @abstractmethod
    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None, *, min_confidence: float = 0.0,
                open_confidence: float = 0.0) -> Proposal:
        """Draft up to ``gamma`` tokens after ``context`` (stopping early at a stop token).

        Rolls the state back to the longest prefix it shares with ``context`` first, so a
        rejected suffix from the previous round is discarded. When ``cancel`` is set, drafting
        stops after the current token (the caller drops the result): drafting ahead uses this.
        A model backend also stops after a token its own distribution gives less than
        ``min_confidence`` (see ``confident``), and drafts nothing when its most likely first
        token has less than ``open_confidence`` (see ``opens``): the draft's own numbers decide
        how long a round is, so the target's distribution is still followed exactly.
        """

    def guess_next(self, state: DraftState, context: list[int]) -> int:
        """The draft's greedy next token after ``context``: the guess of a verdict's bonus token."""
        return self.propose(state, context, 1, GREEDY, 0, frozenset(), 1).token_ids[0]

    def release(self, state: DraftState) -> None:  # noqa: B027 - optional hook
        """Free what a finished session held."""

    def warm_up(self, prompt_tokens: int = 32, gamma: int = 4) -> None:  # noqa: B027 - optional
        """Rehearse a session's first rounds on a throw-away context before any user's tokens
        (kernels and allocator warm); backends without a model to warm keep this no-op."""


class IncrementalState(DraftState):
    """The tokens a backend's cache covers, in order; subclasses add the cache itself."""

    def __init__(self) -> None:
        self.tokens: list[int] = []


class IncrementalBackend(DraftBackend):
    """The drafting loop shared by backends that feed tokens into a truncatable cache.

    A subclass implements ``_truncate`` (drop cached positions past ``keep``) and ``_feed``
    (append tokens, return the last position's logits); sampling is ``common.sampling``'s, so
    every backend sends the same sparse distributions for the same logits.
    """

    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None, *, min_confidence: float = 0.0,
                open_confidence: float = 0.0) -> Proposal:
        assert isinstance(state, IncrementalState)
        proposal = Proposal(token_ids=[])
        if gamma == 0:
            return proposal
        self._rollback(state, context)
        logits = self._feed(state, context[len(state.tokens):])
        if not opens(logits, open_confidence):
            return proposal  # a round of the target's token alone: its one-row pass is cheaper
        generator = None if params.greedy else round_generator(params.seed, seq, "draft")
        for step in range(gamma):
            token = _choose(logits, params, generator, max_support, proposal)
            proposal.token_ids.append(token)
            if (token in stop_token_ids or step == gamma - 1 or (cancel is not None and cancel.is_set())
                    or not confident(logits, token, proposal, min_confidence)):
                break
            logits = self._feed(state, [token])
        return proposal

    def warm_up(self, prompt_tokens: int = 32, gamma: int = 4) -> None:
        state = self.new_state()
        context = [3 + i % max(1, self.vocab_size - 3) for i in range(prompt_tokens)]
        try:
            for seq in range(3):
                proposal = self.propose(state, context, max(1, gamma), GREEDY, seq, frozenset(), 1)
                context = context + proposal.token_ids[:1]  # a verdict that keeps one token
        finally:
            self.release(state)

    def _rollback(self, state: IncrementalState, context: list[int]) -> None:
        """Keep the longest cached prefix of ``context``, leaving at least one token to feed."""
        keep = 0
        limit = min(len(state.tokens), len(context) - 1)
        while keep < limit and state.tokens[keep] == context[keep]:
            keep += 1
        if keep < len(state.tokens):
            self._truncate(state, keep)
            del state.tokens[keep:]

    @abstractmethod
    def _truncate(self, state: Any, keep: int) -> None:
        """Drop cached positions from ``keep`` on (``state.tokens`` is trimmed by the caller)."""

    @abstractmethod
    def _feed(self, state: Any, tokens: list[int]) -> torch.Tensor:  # [V] float32 on the CPU
        """Run ``tokens`` through the model on top of the cache; extend ``state.tokens``."""


def cut_options(backend: DraftBackend, min_confidence: float,
                open_confidence: float = 0.0) -> dict[str, float]:
    """``propose``'s keywords for the confidence cut and the first-token bar, where ``backend``
    takes them.

    A drafter written before either existed (a registered plugin whose ``propose`` lacks the
    parameter) keeps working: it drafts as it always did.
    """
    wanted = {"min_confidence": min_confidence, "open_confidence": open_confidence}
    return {name: value for name, value in wanted.items() if value > 0.0 and _takes(type(backend), name)}


@functools.cache
def _takes(kind: type[DraftBackend], parameter: str) -> bool:
    return parameter in inspect.signature(kind.propose).parameters


def opens(logits: torch.Tensor, open_confidence: float) -> bool:
    """Whether a round should draft at all: the draft's most likely next token has at least
    ``open_confidence``.

    Why: a verifier pass costs by its rows, and on a CPU one row is far cheaper than two
    (SmolLM2-135M: 55 against 87 ms), so a first draft token the target will likely reject costs
    more than it brings. The bar reads only the draft's distribution at the context, before any
    token is chosen, so skipping never depends on a sampled token and sampling stays exact.
    """
    if open_confidence <= 0.0:
        return True
    return float(torch.softmax(logits.float(), dim=-1).max()) >= open_confidence


def confident(logits: torch.Tensor, token: int, proposal: Proposal, min_confidence: float) -> bool:
    """Whether the draft gave its just-drafted ``token`` at least ``min_confidence``.

    The draft's own probability of that token: from the sparse distribution it sends when
    sampling, else the softmax of its logits. Below the threshold the next token is unlikely to
    be accepted either, so drafting on would cost draft time and verifier rows for nothing
    (transformers' assisted generation stops the same way: ``assistant_confidence_threshold``).
    """
    if min_confidence <= 0.0:
        return True
    if proposal.support_ids:  # sampled: the probability the draft sends for the token
        ids, probs = proposal.support_ids[-1], proposal.support_probs[-1]
        hit = np.flatnonzero(ids == token)
        return bool(hit.size) and float(probs[hit[0]]) >= min_confidence
    return float(torch.softmax(logits.float(), dim=-1)[token]) >= min_confidence


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
            max_support: int, proposal: Proposal) -> int:
    if generator is None:
        return int(logits.argmax())
    probs = filter_logits(logits[None], params.temperature, params.top_k, params.top_p)[0]
    dist = sparse_draft_distribution(probs, max_support)
    proposal.support_sizes.append(int(dist.ids.size))
    proposal.support_ids.append(dist.ids)
    proposal.support_probs.append(dist.probs)
    return sample_sparse(dist, generator)
