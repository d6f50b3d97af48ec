"""Torch draft backend (CPU, CUDA): any Hugging Face causal LM with a DynamicCache."""

from __future__ import annotations

from typing import Any

import torch

from common.models import LoadedModel, crop_cache
from common.sampling import (
    SamplingParams,
    filter_logits,
    round_generator,
    sample_sparse,
    sparse_draft_distribution,
)
from edge_worker.backends.base import DraftBackend, DraftState, Proposal


class TorchDraftState(DraftState):
    def __init__(self) -> None:
        from transformers import DynamicCache

        self.cache: Any = DynamicCache()
        self.tokens: list[int] = []  # the tokens the cache covers, in order


class TorchDraftBackend(DraftBackend):
    name = "torch"

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.device = str(loaded.device)
        self.vocab_size = loaded.vocab_size
        self.fingerprint = loaded.fingerprint
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids

    def new_state(self) -> TorchDraftState:
        return TorchDraftState()

    @torch.inference_mode()
    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int) -> Proposal:
        assert isinstance(state, TorchDraftState)
        proposal = Proposal(token_ids=[])
        if gamma == 0:
            return proposal
        self._rollback(state, context)
        logits = self._feed(state, context[len(state.tokens):])
        generator = None if params.greedy else round_generator(params.seed, seq, "draft")
        for step in range(gamma):
            token = self._choose(logits, params, generator, max_support, proposal)
            proposal.token_ids.append(token)
            if token in stop_token_ids or step == gamma - 1:
                break
            logits = self._feed(state, [token])
        return proposal

    def _rollback(self, state: TorchDraftState, context: list[int]) -> None:
        """Keep the longest cached prefix of ``context``, leaving at least one token to feed."""
        keep = 0
        limit = min(len(state.tokens), len(context) - 1)
        while keep < limit and state.tokens[keep] == context[keep]:
            keep += 1
        crop_cache(state.cache, keep)
        del state.tokens[keep:]

    def _feed(self, state: TorchDraftState, tokens: list[int]) -> torch.Tensor:  # [V]
        start = len(state.tokens)
        ids = torch.tensor([tokens], device=self.model.device)
        positions = torch.arange(start, start + len(tokens), device=self.model.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=state.cache,
                         use_cache=True, logits_to_keep=1)
        state.cache = out.past_key_values
        state.tokens.extend(tokens)
        return out.logits[0, -1].float().cpu()

    @staticmethod
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
