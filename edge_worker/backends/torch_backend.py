"""Torch draft backend (CPU, CUDA): any Hugging Face causal LM with a DynamicCache.

A Llama whose layers are 4-bit (``smollm2-135m-int4``) runs through the compact decoder of
``common/int4_llama.py`` instead, with its own key/value buffer per session: at 4 bits,
transformers' per-layer bookkeeping costs as much as the products."""

from __future__ import annotations

from typing import Any

import torch

from common.cpu_linear import use_onednn_linears
from common.int4_llama import Int4Llama
from common.models import LoadedModel, crop_cache, forward_with_cache
from edge_worker.backends.base import IncrementalBackend, IncrementalState


class TorchDraftState(IncrementalState):
    def __init__(self, cache: Any) -> None:
        super().__init__()
        self.cache = cache  # a transformers DynamicCache, or the compact decoder's KeyValues


class TorchDraftBackend(IncrementalBackend):
    name = "torch"

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        use_onednn_linears(self.model)  # CPU float32 only (common/cpu_linear.py)
        self.device = str(loaded.device)
        self.vocab_size = loaded.vocab_size
        self.fingerprint = loaded.fingerprint
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.compact = Int4Llama.of(self.model)

    def new_state(self) -> TorchDraftState:
        from transformers import DynamicCache

        return TorchDraftState(self.compact.new_cache() if self.compact else DynamicCache())

    def _truncate(self, state: TorchDraftState, keep: int) -> None:
        if self.compact:
            state.cache.length = min(state.cache.length, keep)
        else:
            crop_cache(state.cache, keep)

    @torch.inference_mode()
    def _feed(self, state: TorchDraftState, tokens: list[int]) -> torch.Tensor:  # [V]
        if self.compact:
            logits = self.compact.step(state.cache, tokens)
            state.tokens.extend(tokens)
            return logits
        start = len(state.tokens)
        ids = torch.tensor([tokens], device=self.model.device)
        positions = torch.arange(start, start + len(tokens), device=self.model.device)[None]
        out, state.cache = forward_with_cache(self.model, state.cache, input_ids=ids,
                                              position_ids=positions, logits_to_keep=1)
        state.tokens.extend(tokens)
        return out.logits[0, -1].float().cpu()
