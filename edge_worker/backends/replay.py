"""Replay draft backend: no model; proposes the target's own continuation with a set acceptance.

Load tests need thousands of sessions; thousands of draft models would measure the edge, not the
verifier pool. This backend reads reference continuations computed once by running the target
greedily on the prompt set (a *replay file*, made by ``specd loadtest --make-replay``) and, at
each drafted position, proposes the reference next token with probability ``acceptance`` and a
different token otherwise. Verification stays real.

For greedy sessions the verifier's output is exactly the target's greedy output, so the context
stays a prefix of the reference after every verdict (mismatches are rejected and replaced by the
target's token, which is the reference token): the per-token acceptance is ``acceptance``
(Leviathan et al.'s alpha). For sampled sessions the backend sends a sparse draft distribution
shaped like a real draft's (a peaked head over a few dozen tokens) and samples from it, so the
verifier does full rejection sampling and the output follows the target's distribution; once a
sampled session leaves the reference, drafts become plausible-looking noise (mostly rejected).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.models import ModelLoadError, load_tokenizer, vocab_fingerprint
from common.sampling import SamplingParams
from edge_worker.backends.base import DraftBackend, DraftState, Proposal

REPLAY_VERSION = 1
HEAD_SUPPORT = 16
"""Support size of a sampled replay draft distribution (capped by max_support)."""


@dataclass
class ReplayFile:
    """Reference continuations keyed by prompt ids, with the target's vocabulary fingerprint."""

    target: str
    fingerprint: str
    entries: dict[tuple[int, ...], list[int]]  # prompt ids -> target greedy continuation
    vocab_size: int
    eos_token_ids: frozenset[int] = frozenset()
    max_new_tokens: int = 0

    @classmethod
    def load(cls, path: str | Path) -> ReplayFile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read the replay file {str(path)!r}: {exc}") from exc
        if data.get("version") != REPLAY_VERSION:
            raise ModelLoadError(f"replay file {str(path)!r}: unsupported version {data.get('version')}")
        return cls(target=data["target"], fingerprint=data["fingerprint"],
                   entries={tuple(e["prompt_ids"]): list(e["continuation"]) for e in data["entries"]},
                   vocab_size=int(data["vocab_size"]), eos_token_ids=frozenset(data["eos_token_ids"]),
                   max_new_tokens=int(data.get("max_new_tokens", 0)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({
            "version": REPLAY_VERSION, "target": self.target, "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size, "eos_token_ids": sorted(self.eos_token_ids),
            "max_new_tokens": self.max_new_tokens,
            "entries": [{"prompt_ids": list(p), "continuation": c} for p, c in self.entries.items()],
        }))

    def reference_for(self, context: list[int]) -> list[int] | None:
        """Prompt + continuation of the entry whose prompt starts ``context`` (longest first)."""
        for length in sorted({len(p) for p in self.entries}, reverse=True):
            if length <= len(context):
                continuation = self.entries.get(tuple(context[:length]))
                if continuation is not None:
                    return list(context[:length]) + continuation
        return None


@dataclass
class ReplayState(DraftState):
    reference: list[int] | None = None  # prompt + reference continuation, once resolved
    resolved: bool = False


class ReplayDraftBackend(DraftBackend):
    name = "replay"
    device = "none"

    def __init__(self, replay: ReplayFile, tokenizer: Any, model_name: str, acceptance: float) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"replay acceptance must be in [0, 1], got {acceptance}")
        self.replay = replay
        self.tokenizer = tokenizer
        self.fingerprint = vocab_fingerprint(tokenizer)
        if self.fingerprint != replay.fingerprint:
            raise ModelLoadError(f"the tokenizer of {model_name!r} (vocabulary {self.fingerprint}) is not "
                                 f"the replay file's target vocabulary ({replay.fingerprint})")
        self.vocab_size = replay.vocab_size
        self.model_name = f"replay:{model_name}"
        self.eos_token_ids = replay.eos_token_ids or frozenset(
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.acceptance = acceptance

    @classmethod
    def from_files(cls, replay_file: str, tokenizer_of: str, acceptance: float,
                   trust_remote_code: bool = False) -> ReplayDraftBackend:
        if not replay_file:
            raise ModelLoadError("the replay backend needs edge.replay_file "
                                 "(make one with `specd loadtest --make-replay PATH`)")
        return cls(ReplayFile.load(replay_file), load_tokenizer(tokenizer_of, trust_remote_code),
                   tokenizer_of, acceptance)

    def new_state(self) -> ReplayState:
        return ReplayState()

    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None, *, min_confidence: float = 0.0,
                open_confidence: float = 0.0) -> Proposal:
        """Replay needs no cancellation (a proposal costs microseconds) and has no confidence."""
        assert isinstance(state, ReplayState)
        proposal = Proposal(token_ids=[])
        if not state.resolved:
            state.reference, state.resolved = self.replay.reference_for(context), True
        rng = np.random.default_rng([params.seed, seq, len(context)])
        on_reference = state.reference is not None and state.reference[:len(context)] == context
        for step in range(gamma):
            position = len(context) + step
            reference = state.reference[position] if on_reference and state.reference is not None \
                and position < len(state.reference) else None
            token = self._draft_one(rng, reference, params, max_support, proposal)
            proposal.token_ids.append(token)
            on_reference = on_reference and token == reference
            if token in stop_token_ids:
                break
        return proposal

    def _draft_one(self, rng: np.random.Generator, reference: int | None, params: SamplingParams,
                   max_support: int, proposal: Proposal) -> int:
        hit = reference is not None and rng.random() < self.acceptance
        if params.greedy:
            return int(reference) if hit and reference is not None else self._other_token(rng, reference)
        ids, probs = self._sparse_distribution(rng, reference if hit else None, max_support)
        proposal.support_sizes.append(int(ids.size))
        proposal.support_ids.append(ids)
        proposal.support_probs.append(probs)
        exact = probs.astype(np.float64)
        exact /= exact.sum()  # exactly the verifier's normalisation of what is sent
        return int(ids[int(rng.choice(ids.size, p=exact))])

    def _other_token(self, rng: np.random.Generator, avoid: int | None) -> int:
        token = int(rng.integers(self.vocab_size))
        if token == avoid:
            token = (token + 1) % self.vocab_size
        return token

    def _sparse_distribution(self, rng: np.random.Generator, head: int | None,
                             max_support: int) -> tuple[np.ndarray, np.ndarray]:
        """A peaked distribution over a few distinct tokens; ``head`` (if any) gets the top mass."""
        size = max(1, min(HEAD_SUPPORT, max_support, self.vocab_size))
        ids = rng.choice(self.vocab_size, size=size, replace=False).astype(np.uint32)
        if head is not None:
            where = np.flatnonzero(ids == head)
            if where.size:
                ids[where[0]] = ids[0]
            ids[0] = head
        logits = -np.arange(size, dtype=np.float64) * rng.uniform(0.5, 2.0)  # Zipf-like fall-off
        probs = np.exp(logits)
        return ids, (probs / probs.sum()).astype(np.float32)
