"""Feature drafting on the edge (common.feature_draft): drafts from the target's last feature.

The session's state is the feature the last verdict carried and the context length it belongs
to. A round whose context that feature does not describe (the first round, a resumed session, a
verifier that sends no features) drafts nothing: the verifier's pass then commits one token and
returns the feature, and drafting resumes on the next round. Drafts are always verified, so a
missing, stale or forged feature can only lower acceptance, never change the output.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from common.feature_draft import FeatureDraft
from common.sampling import SamplingParams, round_generator
from edge_worker.backends.base import GREEDY, DraftBackend, DraftState, Proposal, _choose, confident


class FeatureDraftState(DraftState):
    def __init__(self) -> None:
        self.feature: torch.Tensor | None = None  # [1, H] float32
        self.length = 0  # the committed context length whose last token the feature produced


class FeatureDraftBackend(DraftBackend):
    name = "torch"
    wants_features = True
    standalone = False

    def __init__(self, draft: FeatureDraft, tokenizer: Any, fingerprint: str, model_name: str,
                 eos_token_ids: frozenset[int]) -> None:
        self.draft = draft
        self.device = "cpu"
        self.vocab_size = draft.config.vocab_size
        self.fingerprint = fingerprint
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.subset = draft.head.token_ids  # [K]: the ids the head scores

    def new_state(self) -> FeatureDraftState:
        return FeatureDraftState()

    def observe(self, state: DraftState, feature: bytes, committed: int) -> None:
        assert isinstance(state, FeatureDraftState)
        values = np.frombuffer(feature, dtype="<f2")
        if values.size != self.draft.config.hidden_size or not np.all(np.isfinite(values)):
            state.feature = None  # another model's, or damaged: draft nothing until the next one
            return
        state.feature = torch.from_numpy(values.astype(np.float32))[None]
        state.length = committed

    @torch.inference_mode()
    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None, *, min_confidence: float = 0.0,
                open_confidence: float = 0.0) -> Proposal:
        """``open_confidence`` is not applied: a feature draft's round is already the target's
        token alone whenever it lacks a feature, and its steps cost a fraction of a model draft's."""
        assert isinstance(state, FeatureDraftState)
        proposal = Proposal(token_ids=[])
        if gamma == 0 or state.feature is None or state.length != len(context):
            return proposal  # no feature for this context: this round only commits the target's token
        generator = None if params.greedy else round_generator(params.seed, seq, "draft")
        feature, token = state.feature, context[-1]
        for step in range(gamma):
            feature = self.draft.step(feature, torch.tensor([token]))
            token, sure = self._choose(feature, params, generator, max_support, proposal, min_confidence)
            proposal.token_ids.append(token)
            if (token in stop_token_ids or step == gamma - 1 or (cancel is not None and cancel.is_set())
                    or not sure):
                break
        return proposal

    def _choose(self, feature: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                max_support: int, proposal: Proposal, min_confidence: float) -> tuple[int, bool]:
        """The next token, and whether the draft is at least ``min_confidence`` sure of it."""
        if generator is None:  # greedy: the best subset id, no full-vocabulary row
            logits = self.draft.head.subset_logits(feature)[0].float()
            best = int(logits.argmax())
            return int(self.subset[best]), confident(logits, best, Proposal([]), min_confidence)
        logits = self.draft.head(feature)[0].float()
        token = _choose(logits, params, generator, max_support, proposal)
        return token, confident(logits, token, proposal, min_confidence)

    def guess_next(self, state: DraftState, context: list[int]) -> int:
        raise NotImplementedError("a feature draft cannot draft ahead: it needs the verdict's feature")

    def warm_up(self, prompt_tokens: int = 32, gamma: int = 4) -> None:
        state = self.new_state()
        state.feature, state.length = torch.zeros(1, self.draft.config.hidden_size), prompt_tokens
        for _ in range(3):
            self.propose(state, [3] * prompt_tokens, max(1, gamma), GREEDY, 0, frozenset(), 1)
