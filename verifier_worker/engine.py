"""The target side of a round, for a whole batch of sessions: verify, accept, roll back.

``TargetEngine.verify`` runs exactly one forward pass of the target over every request in the
batch. A request's input is whatever its KV cache lacks of the committed context (one token in
steady state; the whole prompt on a session's first round, or after a cache was lost) followed
by its drafted tokens, so prefill and context rebuild ride in the same pass as verification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.sampling import SamplingParams, draw_round_noise, filter_logits, rejection_sample
from verifier_worker.kv import SessionKV


@dataclass
class Draft:
    """A draft as the engine needs it (decoded and validated by the caller)."""

    token_ids: np.ndarray  # [gamma] uint32
    support_sizes: np.ndarray  # [gamma] uint16, or [0] for greedy
    support_ids: np.ndarray  # [sum(support_sizes)] uint32
    support_probs: np.ndarray  # [sum(support_sizes)] float32

    @classmethod
    def empty(cls) -> Draft:
        empty_ids = np.zeros(0, dtype=np.uint32)
        return cls(empty_ids, np.zeros(0, dtype=np.uint16), empty_ids, np.zeros(0, np.float32))

    @property
    def gamma(self) -> int:
        return int(self.token_ids.size)


@dataclass
class VerifyRequest:
    kv: SessionKV
    context: list[int]  # committed tokens: prompt + generated so far
    draft: Draft
    params: SamplingParams
    seq: int  # round sequence number, keys the round's random draws


@dataclass(frozen=True)
class VerifyOutcome:
    accepted: int
    token: int


class TargetEngine:
    """Batched verification on a loaded Hugging Face causal LM."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.num_layers = int(model.config.num_hidden_layers)
        self.device = next(model.parameters()).device
        self.forward_passes = 0

    @torch.inference_mode()
    def verify(self, requests: list[VerifyRequest]) -> list[VerifyOutcome]:
        """One target forward over all requests, then rejection sampling and cache rollback."""
        logits = self._forward(requests)  # per request [gamma + 1, V]
        outcomes = self._accept(requests, logits)
        for request, outcome in zip(requests, outcomes, strict=True):
            # The cache must cover the new context minus its last token (the recovered/bonus
            # token is fed at the start of the next round).
            request.kv.truncate(len(request.context) + outcome.accepted)
        return outcomes

    # ------------------------------------------------------------------ forward

    def _forward(self, requests: list[VerifyRequest]) -> list[torch.Tensor]:
        inputs = [r.context[r.kv.length:] + r.draft.token_ids.tolist() for r in requests]
        if any(len(tokens) == 0 for tokens in inputs):
            raise ValueError("a request has nothing to feed: its cache covers the whole context")
        keep = max(r.draft.gamma for r in requests) + 1
        batch = _PaddedBatch.build(requests, inputs, self.num_layers, self.device)
        out = self.model(
            input_ids=batch.input_ids, position_ids=batch.position_ids,
            attention_mask=batch.attention_mask, past_key_values=batch.cache,
            use_cache=True, logits_to_keep=keep,
        )
        self.forward_passes += 1
        batch.store_new_kv(out.past_key_values, requests, inputs)
        return [out.logits[i, keep - (r.draft.gamma + 1):].float() for i, r in enumerate(requests)]

    # ------------------------------------------------------------------ accept

    def _accept(self, requests: list[VerifyRequest], logits: list[torch.Tensor]) -> list[VerifyOutcome]:
        batch = len(requests)
        max_gamma = max(r.draft.gamma for r in requests)
        max_support = max((int(r.draft.support_sizes.max()) for r in requests
                           if r.draft.support_sizes.size), default=1)
        vocab = logits[0].shape[-1]
        target = torch.zeros(batch, max_gamma + 1, vocab)
        draft_ids = torch.zeros(batch, max_gamma, dtype=torch.long)
        draft_q = torch.ones(batch, max_gamma)
        support_ids = torch.zeros(batch, max_gamma, max_support, dtype=torch.long)
        support_probs = torch.zeros(batch, max_gamma, max_support)
        uniforms = torch.zeros(batch, max_gamma)
        exponentials = torch.ones(batch, vocab)
        for i, r in enumerate(requests):
            gamma, params = r.draft.gamma, r.params
            draft_ids[i, :gamma] = torch.from_numpy(r.draft.token_ids.astype(np.int64))
            if params.greedy:
                target[i, : gamma + 1] = logits[i]  # only the argmax matters for greedy rows
                continue
            target[i, : gamma + 1] = filter_logits(logits[i], params.temperature, params.top_k,
                                                   params.top_p)
            noise = draw_round_noise(params.seed, r.seq, gamma, vocab)
            uniforms[i, :gamma], exponentials[i] = noise.uniforms, noise.exponentials
            _fill_support(r.draft, support_ids[i], support_probs[i], draft_q[i])
        result = rejection_sample(
            target, draft_ids, torch.tensor([r.draft.gamma for r in requests]), draft_q,
            support_ids, support_probs, uniforms, exponentials,
            torch.tensor([r.params.greedy for r in requests]),
        )
        return [VerifyOutcome(int(a), int(t))
                for a, t in zip(result.num_accepted.tolist(), result.next_token.tolist(), strict=True)]


def _fill_support(draft: Draft, ids_out: torch.Tensor, probs_out: torch.Tensor,
                  token_q_out: torch.Tensor) -> None:
    """Scatter a draft's concatenated sparse supports into padded ``[G, K]`` rows."""
    offsets = np.concatenate(([0], np.cumsum(draft.support_sizes.astype(np.int64))))
    for j, token in enumerate(draft.token_ids.tolist()):
        ids = draft.support_ids[offsets[j]: offsets[j + 1]].astype(np.int64)
        probs = draft.support_probs[offsets[j]: offsets[j + 1]].astype(np.float64)
        probs = probs / probs.sum()  # exactly the edge's normalisation (common.sampling)
        ids_out[j, : ids.size] = torch.from_numpy(ids)
        probs_out[j, : ids.size] = torch.from_numpy(probs.astype(np.float32))
        token_q_out[j] = float(probs[int(np.flatnonzero(ids == token)[0])])


@dataclass
class _PaddedBatch:
    """Left-padded inputs and cache for sessions of different lengths, with a 4D mask."""

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, 1, T, P + T] additive, None when B == 1
    cache: Any  # DynamicCache over [B, kv_heads, P, head_dim] per layer
    past: int  # P

    @classmethod
    def build(cls, requests: list[VerifyRequest], inputs: list[list[int]], num_layers: int,
              device: torch.device) -> _PaddedBatch:
        from transformers import DynamicCache

        lengths = [r.kv.length for r in requests]
        past, width = max(lengths), max(len(tokens) for tokens in inputs)
        input_ids = torch.zeros(len(requests), width, dtype=torch.long)
        position_ids = torch.zeros(len(requests), width, dtype=torch.long)
        for i, (tokens, start) in enumerate(zip(inputs, lengths, strict=True)):
            input_ids[i, width - len(tokens):] = torch.tensor(tokens)
            position_ids[i, width - len(tokens):] = torch.arange(start, start + len(tokens))
        layers = [_stack_layer(requests, layer, past) for layer in range(num_layers)] if past else None
        mask = None
        if len(requests) > 1:
            mask = _attention_mask(lengths, [len(t) for t in inputs], past, width)
        return cls(input_ids.to(device), position_ids.to(device),
                   None if mask is None else mask.to(device),
                   DynamicCache(ddp_cache_data=layers) if layers else DynamicCache(), past)

    def store_new_kv(self, cache: Any, requests: list[VerifyRequest], inputs: list[list[int]]) -> None:
        """Append each request's new keys/values (its real, unpadded inputs) to its cache."""
        width = self.input_ids.shape[1]
        for i, (request, tokens) in enumerate(zip(requests, inputs, strict=True)):
            begin = self.past + width - len(tokens)
            request.kv.append([layer.keys[i, :, begin:] for layer in cache.layers],
                              [layer.values[i, :, begin:] for layer in cache.layers])


def _stack_layer(requests: list[VerifyRequest], layer: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    first_k, _ = next(r.kv.layer(layer) for r in requests if r.kv.length)
    heads, _, dim = first_k.shape
    keys = first_k.new_zeros(len(requests), heads, past, dim)
    values = first_k.new_zeros(len(requests), heads, past, dim)
    for i, request in enumerate(requests):
        if request.kv.length:
            k, v = request.kv.layer(layer)
            keys[i, :, past - request.kv.length:] = k
            values[i, :, past - request.kv.length:] = v
    return keys, values


def _attention_mask(past_lengths: list[int], input_lengths: list[int], past: int,
                    width: int) -> torch.Tensor:  # [B, 1, T, P + T] float additive
    """Causal attention over each row's real keys; padded query rows attend only to themselves.

    Letting padding rows see themselves keeps every softmax row non-empty, so no NaN can arise
    and leak into real rows through the cached values.
    """
    batch = len(past_lengths)
    key_index = torch.arange(past + width)
    query_index = past + torch.arange(width)
    past_len = torch.tensor(past_lengths).view(batch, 1, 1)
    new_len = torch.tensor(input_lengths).view(batch, 1, 1)
    key = key_index.view(1, 1, -1)
    query = query_index.view(1, -1, 1)
    real_past = (key < past) & (key >= past - past_len)
    real_new = (key >= past + width - new_len) & (key <= query)
    real_query = query >= past + width - new_len
    allowed = ((real_past | real_new) & real_query) | (~real_query & (key == query))
    mask = torch.zeros(batch, 1, width, past + width)
    return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)


def generate_target_only(engine: TargetEngine, prompt_ids: list[int], params: SamplingParams,
                         stop_token_ids: frozenset[int], max_new_tokens: int) -> list[int]:
    """Plain autoregressive decoding on the target: one forward pass per token, same code path.

    Each step is a verification with zero drafted tokens, so the token comes from the target's
    (filtered) distribution and the round noise of step ``seq`` (the cloud-only baseline).
    """
    from common.sampling import apply_stop_rules

    kv, context = SessionKV(), list(prompt_ids)
    generated: list[int] = []
    for seq in range(max_new_tokens):
        outcome = engine.verify([VerifyRequest(kv, context, Draft.empty(), params, seq)])[0]
        kept, finish = apply_stop_rules([outcome.token], len(generated), stop_token_ids,
                                        max_new_tokens)
        generated.extend(kept)
        context.extend(kept)
        if finish:
            break
    return generated
