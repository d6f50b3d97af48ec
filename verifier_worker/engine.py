"""The target side of a round, for a whole batch of sessions: verify, accept, roll back.

``TargetEngine.verify`` runs exactly one forward pass of the target over every request in the
batch. A request's input is whatever its KV cache lacks of the committed context (one token in
steady state; the whole prompt on a session's first round, or after a cache was lost) followed
by its drafted tokens, so prefill and context rebuild ride in the same pass as verification.

The pass is packed, not padded: every request's new tokens sit side by side in one row, so the
token-wise layers (projections, MLP, norms) see exactly the real tokens. Attention goes through
``slot_attention``, registered with transformers' ``AttentionInterface``: per layer it writes each
request's new keys/values into the session's extent of the worker's ``KVArena`` and attends to a
view of that extent. No session's cache is gathered, padded or copied per pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.sampling import SamplingParams, draw_round_noise, filter_logits, rejection_sample
from verifier_worker.kv import ArenaShape, KVArena, SessionKV

SLOT_ATTENTION = "specd_slots"
DEFAULT_KV_BUDGET_TOKENS = 65536


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
    reserve: int = 0  # KV positions to reserve when the session has no extent yet


@dataclass(frozen=True)
class VerifyOutcome:
    accepted: int
    token: int


class TargetEngine:
    """Batched verification on a loaded Hugging Face causal LM with a fixed KV budget."""

    def __init__(self, model: Any, vocab_size: int,
                 kv_budget_tokens: int = DEFAULT_KV_BUDGET_TOKENS) -> None:
        self.model = model
        self.vocab_size = vocab_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.arena = KVArena(arena_shape(model.config), kv_budget_tokens, self.dtype, self.device)
        self.num_layers = self.arena.shape.layers
        use_slot_attention(model)
        self.forward_passes = 0

    def set_kv_budget(self, tokens: int) -> None:
        """Re-size the KV arena (``pool.kv_budget_tokens``); only while no session holds memory."""
        if tokens == self.arena.budget_tokens:
            return
        if self.arena.used_tokens:
            raise RuntimeError("the KV arena cannot be re-sized while sessions hold extents")
        self.arena = KVArena(self.arena.shape, tokens, self.dtype, self.device)

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
        for request, tokens in zip(requests, inputs, strict=True):
            self._reserve(request, request.kv.length + len(tokens))
        packed = _PackedPass.build(self.arena, requests, inputs)
        out = self.model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
            logits_to_keep=packed.keep, specd_pass=packed,
        )
        self.forward_passes += 1
        packed.check_layers(self.num_layers)
        for request, tokens in zip(requests, inputs, strict=True):
            if request.kv.allocated:  # not freed meanwhile (a session lost during the pass)
                request.kv.length += len(tokens)
        logits = out.logits[0].float()  # [sum(gamma + 1), V]
        return list(logits.split([r.draft.gamma + 1 for r in requests]))

    def _reserve(self, request: VerifyRequest, needed: int) -> None:
        """Make the session's extent hold ``needed`` positions (its reserve on first use)."""
        kv = request.kv
        if kv.allocated and kv.size >= needed:
            return
        size = max(needed, request.reserve) if not kv.allocated else max(needed, 2 * kv.size)
        self.arena.allocate(kv, size)

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


def arena_shape(config: Any) -> ArenaShape:
    """The KV layout of a decoder-only model; refuses attention the slot kernel cannot reproduce."""
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or getattr(
            config, "attn_logit_softcapping", None):
        raise ValueError(f"{config.model_type}: sliding-window or soft-capped attention is not "
                         "supported by the verifier's KV arena (full causal attention only)")
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ArenaShape(layers=int(config.num_hidden_layers),
                      kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                      head_dim=int(head_dim))


def use_slot_attention(model: Any) -> None:
    """Route the model's attention through ``slot_attention`` (plain SDPA when called without a
    packed pass, e.g. by ``generate``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SLOT_ATTENTION, slot_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SLOT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(SLOT_ATTENTION)


def slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None,
                   dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: the packed pass's per-session attention over the arena."""
    packed = kwargs.pop("specd_pass", None)
    if packed is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return packed.attend(module.layer_idx, query, key, value, scaling), None


@dataclass
class _Row:
    start: int  # the session's extent in the arena, as allocated for this pass
    offset: int  # first position of this request's new tokens in the packed row
    count: int  # new tokens
    past: int  # cached positions before this pass
    mask: torch.Tensor | None  # [group * count, past + count] bool, None for one token


@dataclass
class _PackedPass:
    """All requests' new tokens in one row, and where each one's keys live in the arena."""

    arena: KVArena
    rows: list[_Row]
    input_ids: torch.Tensor  # [1, N] N = total new tokens
    position_ids: torch.Tensor  # [1, N]
    keep: torch.Tensor  # [sum(gamma + 1)] indices of the positions whose logits are needed
    layers_seen: int = 0

    @classmethod
    def build(cls, arena: KVArena, requests: list[VerifyRequest], inputs: list[list[int]]) -> _PackedPass:
        rows: list[_Row] = []
        ids: list[int] = []
        positions: list[int] = []
        keep: list[int] = []
        offset = 0
        for request, tokens in zip(requests, inputs, strict=True):
            past, count = request.kv.length, len(tokens)
            rows.append(_Row(request.kv.start, offset, count, past, None))
            ids.extend(tokens)
            positions.extend(range(past, past + count))
            keep.extend(range(offset + count - request.draft.gamma - 1, offset + count))
            offset += count
        device = arena.keys[0].device
        return cls(arena, rows, torch.tensor([ids], device=device),
                   torch.tensor([positions], device=device), torch.tensor(keep, device=device))

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """query ``[1, Hq, N, D]``, key/value ``[1, Hkv, N, D]`` -> output ``[1, N, Hq, D]``.

        Query heads are grouped onto their shared key/value head (``[Hkv, group * n, D]``), so
        grouped-query attention needs no repeated keys either.
        """
        self.layers_seen += 1
        _, q_heads, total, dim = query.shape
        kv_heads = key.shape[1]
        group = q_heads // kv_heads
        out = query.new_empty(1, total, q_heads, dim)
        for row in self.rows:
            begin, end = row.offset, row.offset + row.count
            self.arena.write(layer, row.start + row.past, key[0, :, begin:end], value[0, :, begin:end])
            keys, values = self.arena.view(layer, row.start, row.start + row.past + row.count)
            q = query[0, :, begin:end].reshape(kv_heads, group * row.count, dim)
            if row.mask is None and row.count > 1:
                row.mask = _offset_causal_mask(row.count, row.past, group, query.device)
            o = F.scaled_dot_product_attention(q[None], keys[None], values[None],
                                               attn_mask=row.mask, scale=scaling)
            out[0, begin:end] = o.view(q_heads, row.count, dim).transpose(0, 1)
        return out

    def check_layers(self, layers: int) -> None:
        if self.layers_seen != layers:
            raise RuntimeError(f"the model ran {self.layers_seen} of {layers} attention layers "
                               "through the slot attention: its architecture is not supported")


def _offset_causal_mask(count: int, past: int, group: int,
                        device: torch.device) -> torch.Tensor:  # [group * count, past + count] bool
    """New token ``i`` sees every cached position and new tokens ``0 .. i``."""
    mask = torch.ones(count, past + count, dtype=torch.bool, device=device).tril(past)
    return mask.repeat(group, 1)


def generate_target_only(engine: TargetEngine, prompt_ids: list[int], params: SamplingParams,
                         stop_token_ids: frozenset[int], max_new_tokens: int) -> list[int]:
    """Plain autoregressive decoding on the target: one forward pass per token, same code path.

    Each step is a verification with zero drafted tokens, so the token comes from the target's
    (filtered) distribution and the round noise of step ``seq`` (the cloud-only baseline).
    """
    from common.sampling import apply_stop_rules

    kv, context = SessionKV(), list(prompt_ids)
    generated: list[int] = []
    reserve = len(prompt_ids) + max_new_tokens
    for seq in range(max_new_tokens):
        outcome = engine.verify([VerifyRequest(kv, context, Draft.empty(), params, seq, reserve)])[0]
        kept, finish = apply_stop_rules([outcome.token], len(generated), stop_token_ids,
                                        max_new_tokens)
        generated.extend(kept)
        context.extend(kept)
        if finish:
            break
    kv.clear()
    return generated
