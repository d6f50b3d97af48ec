"""The target side of a round, for a whole batch of sessions: verify, accept, roll back.

``TargetEngine.verify`` runs exactly one forward pass of the target over every request in the
batch. A request's input is whatever its KV cache lacks of the committed context (one token in
steady state; the whole prompt on a session's first round, or after a cache was lost) followed
by its drafted tokens, so prefill and context rebuild ride in the same pass as verification.

The pass is packed, not padded: every request's new tokens sit side by side in one row, so the
token-wise layers (projections, MLP, norms) see exactly the real tokens. Attention goes through
``slot_attention``, registered with transformers' ``AttentionInterface``: per layer it writes the
pass's new keys/values into the paged ``KVArena`` with one scatter, gathers each row's blocks with
one index and runs one ``scaled_dot_product_attention`` call for the whole pass (rows padded to
the pass's widest row, a per-row causal mask built once per pass and shared by every layer).
Rows whose blocks are consecutive in the arena can skip the gather (``_Extent``): a pass of one
session always does (slice write, attention over a view, no index at all), and on a CPU so does
any row whose context reaches ``IN_PLACE_CONTEXT``. On a CPU a long row whose blocks lie in a few
consecutive runs (``MAX_RUNS``) skips it too (``_Runs``): attention over a view of each run and
over the pass's own new keys, merged by their log-sum-exp (the arena's allocator keeps a
session's blocks in few runs).
Verification (``common.sampling.verify_round``) then runs on the logits' device over the flat
``[sum(gamma + 1), V]`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.cpu_linear import use_onednn_linears
from common.rejection import FlatRound, row_argmax, verify_round
from common.sampling import SamplingParams, normalised_supports, round_uniforms
from common.wire import LOGPROB_FLOOR, TokenLogprobs
from verifier_worker.kv import ArenaShape, KVArena, KVCapacityError, SessionKV

__all__ = ["Draft", "KVCapacityError", "TargetEngine", "VerifyOutcome", "VerifyRequest",
           "generate_target_only"]

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
    logprobs: int | None = None  # None: none; n: the committed tokens' logprobs and top n each
    feature: bool = False  # return the feature that produced the new token (common.feature_draft)


@dataclass(frozen=True)
class VerifyOutcome:
    accepted: int
    token: int
    logprobs: TokenLogprobs | None = None  # of the accepted + 1 new tokens, when asked for
    feature: bytes = b""  # float16 [H]: the output layer's input at the row that produced ``token``


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
        self.group = int(model.config.num_attention_heads) // self.arena.shape.kv_heads
        use_slot_attention(model)
        use_onednn_linears(model)  # CPU float32 only: 1.2x-1.9x cheaper passes (common/cpu_linear.py)
        self.forward_passes = 0
        self._workspace = torch.empty(0)  # float32 scratch of the sampled rows, reused (CPU)
        # A 4D mask counts as "already prepared": transformers then skips building its own causal
        # mask every pass (packed-sequence detection and all), which slot attention never reads.
        self._prepared_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)
        self._head_input: torch.Tensor | None = None  # [1, sum(gamma + 1), H] of the last pass
        model.get_output_embeddings().register_forward_pre_hook(self._keep_head_input)

    def _keep_head_input(self, _module: Any, args: tuple[Any, ...]) -> None:
        """The output layer's input (a reference, no copy): what a feature draft drafts from."""
        self._head_input = args[0]

    def warm_up(self, prompt_tokens: int = 64, gamma: int = 4, rounds: int = 4) -> None:
        """Run a throw-away session through the pass shapes a user's first rounds will have (a
        prefill of ``prompt_tokens``, then verification rounds of ``gamma`` drafts, of none and of
        each length between), so the allocator's pages and the kernels are warm before the first
        real token: a fresh process then decodes at its warm speed. Leaves no blocks held and no
        counters moved."""
        rehearsal = prompt_tokens + (3 * rounds + gamma) * (gamma + 1) + 2 * self.arena.block_tokens
        if self.arena.free_tokens < rehearsal:
            return  # a budget this small has no room to spare for a rehearsal
        kv, passes = SessionKV(), self.forward_passes
        context = [3 + i % max(1, self.vocab_size - 3) for i in range(prompt_tokens)]
        try:
            # greedy rounds with and without drafts, and a sampled one (the sampler's buffers)
            plan = [(gamma, SamplingParams()), (0, SamplingParams()), (0, SamplingParams(0.8, 0.95))]
            # and once each draft length between (a cut-short draft): every pass shape a round can
            # have, since a CPU kernel library builds its kernel for a shape on first sight
            plan = plan * rounds + [(drafted, SamplingParams()) for drafted in range(1, gamma)]
            for seq, (drafted, params) in enumerate(plan):
                draft = Draft.empty()
                draft.token_ids = np.asarray(context[-drafted:] if drafted else [], dtype=np.uint32)
                outcome = self.verify([VerifyRequest(kv, context, draft, params, seq)])[0]
                context = context + [int(t) for t in draft.token_ids[:outcome.accepted]] + [
                    outcome.token]
        finally:
            kv.clear()
            self.forward_passes = passes

    def set_kv_budget(self, tokens: int) -> None:
        """Re-size the KV arena (``pool.kv_budget_tokens``); only while no session holds memory."""
        if tokens == self.arena.budget_tokens:
            return
        if self.arena.used_tokens:
            raise RuntimeError("the KV arena cannot be re-sized while sessions hold blocks")
        self.arena = KVArena(self.arena.shape, tokens, self.dtype, self.device)

    @torch.inference_mode()
    def verify(self, requests: list[VerifyRequest]) -> list[VerifyOutcome]:
        """One target forward over all requests, then rejection sampling and cache rollback."""
        logits = self._forward(requests)  # [sum(gamma + 1), V]
        if all(r.params.greedy for r in requests):
            outcomes = greedy_outcomes(logits, requests)
        else:
            result = verify_round(logits, flat_round(requests), self._scratch(requests, logits))
            outcomes = [VerifyOutcome(int(a), int(t)) for a, t in
                        zip(result.num_accepted.tolist(), result.next_token.tolist(), strict=True)]
        if any(r.logprobs is not None for r in requests):
            outcomes = with_logprobs(logits, requests, outcomes)
        if any(r.feature for r in requests) and self._head_input is not None:
            outcomes = with_features(self._head_input[0], requests, outcomes)
        for request, outcome in zip(requests, outcomes, strict=True):
            # The cache must cover the new context minus its last token (the recovered/bonus
            # token is fed at the start of the next round).
            request.kv.truncate(len(request.context) + outcome.accepted)
        return outcomes

    def _forward(self, requests: list[VerifyRequest]) -> torch.Tensor:  # [sum(gamma + 1), V]
        inputs = [r.context[r.kv.length:] + r.draft.token_ids.tolist() for r in requests]
        if any(len(tokens) == 0 for tokens in inputs):
            raise ValueError("a request has nothing to feed: its cache covers the whole context")
        self.arena.allocate_pass([(r.kv, r.kv.length + len(tokens))
                                  for r, tokens in zip(requests, inputs, strict=True)])
        packed = PackedPass.build(self.arena, requests, inputs, self.group)
        out = self.model(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
            logits_to_keep=packed.keep, specd_pass=packed, attention_mask=self._prepared_mask,
        )
        self.forward_passes += 1
        packed.check_layers(self.num_layers)
        for request, tokens in zip(requests, inputs, strict=True):
            if request.kv.allocated:  # not freed meanwhile (a session lost during the pass)
                request.kv.length += len(tokens)
        return out.logits[0]

    def _scratch(self, requests: list[VerifyRequest], logits: torch.Tensor) -> torch.Tensor | None:
        """A reused float32 buffer for the sampled rows (CPU only: saves page faults per pass)."""
        if logits.device.type != "cpu":
            return None
        rows = sum(r.draft.gamma + 1 for r in requests if not r.params.greedy)
        if 2 * rows * logits.shape[-1] > self._workspace.numel():  # e and a same-sized scratch
            self._workspace = torch.empty(2 * rows * logits.shape[-1], dtype=torch.float32)
        return self._workspace


def with_features(hidden: torch.Tensor, requests: list[VerifyRequest],
                  outcomes: list[VerifyOutcome]) -> list[VerifyOutcome]:
    """Each asking request's feature: the row of ``hidden`` [sum(gamma + 1), H] whose logits
    produced its new token (row ``accepted`` of its own gamma + 1 rows), as float16 bytes."""
    starts = np.cumsum([0] + [r.draft.gamma + 1 for r in requests])[:-1]
    pairs = enumerate(zip(requests, outcomes, strict=True))
    wanted = [(i, int(starts[i]) + o.accepted) for i, (r, o) in pairs if r.feature]
    rows = hidden.index_select(0, torch.tensor([row for _, row in wanted], device=hidden.device))
    values = rows.to(torch.float16).cpu().numpy()
    found = dict(zip((i for i, _ in wanted), values, strict=True))
    return [replace(o, feature=found[i].astype("<f2").tobytes()) if i in found else o
            for i, o in enumerate(outcomes)]


def greedy_outcomes(logits: torch.Tensor, requests: list[VerifyRequest]) -> list[VerifyOutcome]:
    """Greedy verification of an all-greedy batch: one argmax over the rows, the accepted prefix
    compared on the host (what ``verify_round`` computes for greedy rows, without building the
    flat round's sampling arrays or its round noise, which greedy rows never read)."""
    best = row_argmax(logits).tolist()  # [sum(gamma + 1)]
    outcomes, start = [], 0
    for request in requests:
        drafted = request.draft.token_ids.tolist()
        accepted = 0
        while accepted < len(drafted) and best[start + accepted] == drafted[accepted]:
            accepted += 1
        outcomes.append(VerifyOutcome(accepted, best[start + accepted]))
        start += len(drafted) + 1
    return outcomes


def with_logprobs(logits: torch.Tensor, requests: list[VerifyRequest],
                  outcomes: list[VerifyOutcome]) -> list[VerifyOutcome]:
    """The outcomes, with the target's logprobs of each new token for the requests that ask.

    From this pass's logits (no second pass): log-softmax of the raw logits (temperature 1, no
    filter), as OpenAI reports them; the rows of all asking requests in one call. Row ``j`` of a
    request predicts its token ``j``: drafted token ``j`` if accepted, else the correction, and
    after a full acceptance the bonus token.
    """
    starts = np.concatenate(([0], np.cumsum([r.draft.gamma + 1 for r in requests])))
    asking = [b for b, r in enumerate(requests) if r.logprobs is not None]
    rows = np.concatenate([starts[b] + np.arange(outcomes[b].accepted + 1) for b in asking])
    tokens = np.concatenate([[*requests[b].draft.token_ids[:outcomes[b].accepted].tolist(),
                              outcomes[b].token] for b in asking]).astype(np.int64)
    index = torch.from_numpy(rows).to(logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [R, V]
    logprobs.clamp_(min=LOGPROB_FLOOR)
    chosen = logprobs.gather(1, torch.from_numpy(tokens).to(logits.device).unsqueeze(1)).squeeze(1)
    widest = max(requests[b].logprobs or 0 for b in asking)
    top_values, top_ids = logprobs.topk(widest, dim=-1)  # most likely first
    chosen_np, values_np, ids_np = (t.cpu().numpy() for t in (chosen, top_values, top_ids))
    out, at = list(outcomes), 0
    for b in asking:
        count, n = outcomes[b].accepted + 1, requests[b].logprobs or 0
        out[b] = VerifyOutcome(outcomes[b].accepted, outcomes[b].token, TokenLogprobs(
            chosen_np[at:at + count].astype(np.float32),
            ids_np[at:at + count, :n].astype(np.uint32), values_np[at:at + count, :n].astype(np.float32)))
        at += count
    return out


def flat_round(requests: list[VerifyRequest]) -> FlatRound:
    """The verification inputs of a batch, flat and ragged (host arrays, built once per pass)."""
    gamma = np.array([r.draft.gamma for r in requests], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(gamma + 1)))
    rows = int(offsets[-1])
    draft_ids = np.zeros(rows, dtype=np.int64)
    draft_q = np.ones(rows, dtype=np.float32)
    support: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for request, start in zip(requests, offsets[:-1].tolist(), strict=True):
        draft = request.draft
        draft_ids[start:start + draft.gamma] = draft.token_ids
        if not request.params.greedy and draft.gamma:
            support.append(_sparse_rows(draft, start, draft_q))
    params = [r.params for r in requests]
    return FlatRound(
        offsets=offsets, draft_ids=draft_ids, draft_q=draft_q,
        support_rows=_cat([s[0] for s in support], np.int64),
        support_ids=_cat([s[1] for s in support], np.int64),
        support_probs=_cat([s[2] for s in support], np.float32),
        greedy=np.array([p.greedy for p in params], dtype=bool),
        temperature=np.array([max(p.temperature, 1e-5) for p in params], dtype=np.float32),
        top_k=np.array([p.top_k for p in params], dtype=np.int64),
        top_p=np.array([p.top_p for p in params], dtype=np.float32),
        uniforms=round_uniforms([p.seed for p in params], [r.seq for r in requests], gamma),
    )


def _sparse_rows(draft: Draft, start: int, draft_q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A draft's sparse supports as flat (row, id, prob) entries; fills ``draft_q`` at its rows."""
    sizes = draft.support_sizes.astype(np.int64)
    rows = np.repeat(start + np.arange(draft.gamma), sizes)
    ids = draft.support_ids.astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    probs = normalised_supports(draft.support_probs, sizes)  # exactly the edge's normalisation
    token_of_entry = np.repeat(draft.token_ids.astype(np.int64), sizes)
    hit = np.flatnonzero(ids == token_of_entry)
    first_hit = hit[np.searchsorted(hit, offsets[:-1])]  # the drafted token's own entry
    draft_q[start:start + draft.gamma] = probs[first_hit].astype(np.float32)
    return rows, ids, probs.astype(np.float32)


def _cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)


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


SHORT_ROW = 32
"""Rows feeding at most this many tokens (verification) share one padded attention call; longer
ones (prefills, rebuilds) get a second, so a prompt never pads every draft row to its length."""


@dataclass
class _Bucket:
    """One padded attention call: R rows of at most C queries over at most L cached positions."""

    rows: int
    width: int  # C
    blocks: torch.Tensor  # [R * L / block] arena blocks of each row, padded with block 0
    queries: torch.Tensor  # [R * C] packed-token index of each query slot, padding -> 0
    mask: torch.Tensor  # [R, 1, group * C, L] bool: slot (g, c) of row r sees position j


@dataclass
class PackedPass:
    """All requests' new tokens in one row, and where each one's keys live in the arena."""

    arena: KVArena
    input_ids: torch.Tensor  # [1, N] N = total new tokens
    position_ids: torch.Tensor  # [1, N]
    keep: torch.Tensor  # [sum(gamma + 1)] indices of the positions whose logits are needed
    slots: torch.Tensor  # [N] arena slot of each new token (one scatter per layer)
    buckets: list[_Bucket]
    back: torch.Tensor  # [N] row of the buckets' concatenated outputs holding each token
    group: int  # query heads per key/value head
    solo: _Extent | None = None  # batch 1 with consecutive blocks: attention in place, no index
    extents: list[_Extent] = field(default_factory=list)  # long rows attended in place
    runs: list[_Runs] = field(default_factory=list)  # long rows in a few runs, attended in place
    layers_seen: int = 0

    @classmethod
    def build(cls, arena: KVArena, requests: list[VerifyRequest], inputs: list[list[int]],
              group: int | None = None) -> PackedPass:
        device = arena.keys[0].device
        counts = np.array([len(t) for t in inputs], dtype=np.int64)  # [B]
        past = np.array([r.kv.length for r in requests], dtype=np.int64)  # [B]
        starts = np.cumsum(counts) - counts  # [B] offset of each request in the packed row
        row_of_token = np.repeat(np.arange(counts.size), counts)  # [N]
        positions = past[row_of_token] + np.arange(int(counts.sum())) - starts[row_of_token]  # [N]
        table = _block_table([r.kv.blocks for r in requests])  # [B, maxblocks]
        block = arena.block_tokens
        slots = table[row_of_token, positions // block] * block + positions % block
        ends = starts + counts
        keep = np.concatenate([np.arange(e - r.draft.gamma - 1, e) for r, e in
                               zip(requests, ends.tolist(), strict=True)])
        group = group or 1
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in inputs])
        long_row = IN_PLACE_CONTEXT if device.type == "cpu" else np.iinfo(np.int64).max
        extents = [_Extent.build(r.kv.blocks, first, int(p), int(c), block, group, device)
                   if len(requests) == 1 or p + c >= long_row else None
                   for r, first, p, c in zip(requests, starts.tolist(), past, counts, strict=True)]
        if len(requests) == 1 and extents[0] is not None:  # batch 1: nothing to index at all
            empty = torch.zeros(0, dtype=torch.long)
            return cls(arena, as_tensor(ids[None]), as_tensor(positions[None]), as_tensor(keep),
                       empty, [], empty, group, extents[0])
        runs = [_Runs.build(r.kv.blocks, first, int(p), int(c), block)
                if e is None and p + c >= long_row else None
                for r, e, first, p, c in zip(requests, extents, starts.tolist(), past, counts,
                                             strict=True)]
        gathered = np.array([e is None and r is None for e, r in zip(extents, runs, strict=True)],
                            dtype=bool)
        buckets, back = [], np.zeros(positions.size, dtype=np.int64)
        done = 0
        for members in (np.flatnonzero(gathered & (counts <= SHORT_ROW)),
                        np.flatnonzero(gathered & (counts > SHORT_ROW))):
            if members.size:
                bucket, local = _bucket(members, counts, past, starts, table, block, group, device)
                back[np.repeat(starts[members], counts[members]) + _ranges(counts[members])] = local + done
                done += bucket.rows * bucket.width
                buckets.append(bucket)
        in_place = [e for e in extents if e is not None]
        in_runs = [r for r in runs if r is not None]
        spans = [(e.first, e.count) for e in in_place] + [(r.first, r.count) for r in in_runs]
        for first, count in spans:  # their outputs follow the buckets' in the concatenation
            back[first:first + count] = done + np.arange(count)
            done += count
        return cls(arena, as_tensor(ids[None]), as_tensor(positions[None]), as_tensor(keep),
                   as_tensor(slots), buckets, as_tensor(back), group, None, in_place, in_runs)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """query ``[1, Hq, N, D]``, key/value ``[1, Hkv, N, D]`` -> output ``[1, N, Hq, D]``.

        Query heads are grouped onto their shared key/value head (``[R, Hkv, group * C, D]``),
        so grouped-query attention needs no repeated keys either.
        """
        self.layers_seen += 1
        _, q_heads, _, dim = query.shape
        kv_heads = key.shape[1]
        group = q_heads // kv_heads
        if group != self.group:
            raise RuntimeError("the packed pass was built for another head grouping")
        if self.solo is not None:
            keys, values = self.solo.view(self.arena, layer)
            keys[self.solo.past:].copy_(key[0].transpose(0, 1))  # a slice copy, not a scatter
            values[self.solo.past:].copy_(value[0].transpose(0, 1))
            return self.solo.attend(query, keys, values, scaling).unsqueeze(0)
        self.arena.write(layer, self.slots, key[0].transpose(0, 1), value[0].transpose(0, 1))
        outputs = []
        for bucket in self.buckets:  # at most two, whatever the number of sessions
            rows, width = bucket.rows, bucket.width
            q = query[0].index_select(1, bucket.queries)  # [Hq, R * C, D]
            q = q.view(kv_heads, group, rows, width, dim).permute(2, 0, 1, 3, 4)
            q = q.reshape(rows, kv_heads, group * width, dim)
            k, v = self.arena.gather(layer, bucket.blocks)  # [R * L / block, block, Hkv, D]
            k = k.view(rows, -1, kv_heads, dim).transpose(1, 2)  # [R, Hkv, L, D]
            v = v.view(rows, -1, kv_heads, dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bucket.mask, scale=scaling)
            o = o.view(rows, kv_heads, group, width, dim).permute(0, 3, 1, 2, 4)
            outputs.append(o.reshape(rows * width, q_heads, dim))
        for extent in self.extents:  # one call per long row, over a view of its blocks
            outputs.append(extent.attend(query, *extent.view(self.arena, layer), scaling))
        for row in self.runs:  # a call per run of its blocks and one over its new keys
            outputs.append(row.attend(self.arena, layer, query, key, value, scaling))
        flat = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return flat.index_select(0, self.back).unsqueeze(0)

    def check_layers(self, layers: int) -> None:
        if self.layers_seen != layers:
            raise RuntimeError(f"the model ran {self.layers_seen} of {layers} attention layers "
                               "through the slot attention: its architecture is not supported")


IN_PLACE_CONTEXT = 512
"""A row whose context reaches this many positions, and whose blocks are consecutive in the arena,
attends over a view of its blocks with a call of its own instead of joining the gathered batch:
past this length the gathered copy of its keys/values costs more than a call's overhead (the
per-session engine beat the gathered pass at context 2,048: 198 against 247 ms at 8 sessions).
CPU only: on a GPU the gather is a fraction of a millisecond and a call per row costs launches
(H200, context 2,048, 8 layers of Llama-3.1-8B's shape: 13.4 ms in place against 8.3 ms
gathered at 8 sessions, 28.8 against 8.3 at 32; ``benchmarks/results/gpu_in_place.json``)."""


@dataclass
class _Extent:
    """A row whose blocks are consecutive in the arena: its cache is one contiguous extent, so
    attention reads a view of it (no gather, no copy). At batch 1 this is the whole pass (what
    plain ``generate`` with a cache does, without its growing ``cat``)."""

    first: int  # offset of the row's tokens in the packed pass
    start: int  # flat arena slot of the session's position 0
    past: int  # cached positions before this pass
    count: int  # new tokens in this pass
    mask: torch.Tensor | None  # [1, 1, group * count, past + count] bool; None for one query

    @classmethod
    def build(cls, blocks: list[int], first: int, past: int, count: int, block: int, group: int,
              device: torch.device) -> _Extent | None:
        if not blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))):
            return None
        mask = None
        if count > 1:  # query c sees positions 0 .. past + c (the causal offset of a cache)
            seen = torch.arange(past + count, device=device)[None, :] <= (
                past + torch.arange(count, device=device))[:, None]  # [C, L]
            mask = seen.repeat(group, 1).view(1, 1, group * count, past + count)
        return cls(first, blocks[0] * block, past, count, mask)

    def view(self, arena: KVArena, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return arena.extent(layer, self.start, self.past + self.count)  # [L, Hkv, D] each

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float | None) -> torch.Tensor:  # [count, Hq, D]
        _, q_heads, _, dim = query.shape
        kv_heads = keys.shape[1]
        q = query[0, :, self.first:self.first + self.count]  # [Hq, C, D]
        q = q.reshape(1, kv_heads, (q_heads // kv_heads) * self.count, dim)
        o = F.scaled_dot_product_attention(q, keys.transpose(0, 1).unsqueeze(0),
                                           values.transpose(0, 1).unsqueeze(0),
                                           attn_mask=self.mask, scale=scaling)
        return o.reshape(q_heads, self.count, dim).transpose(0, 1)


MAX_RUNS = 8
"""A long row whose cached positions lie in at most this many runs of consecutive blocks is
attended in place run by run (``_Runs``); one more fragmented is gathered. A call per run costs
about what gathering a few blocks does, so a row of context 2,048 (128 blocks of 16) in 8 runs
still reads far less than its gathered copy; ``benchmarks/engine_pass.py --layout grown``."""


@dataclass
class _Runs:
    """A row whose cached positions ``0 .. past - 1`` lie in a few runs of consecutive blocks:
    attention reads a view of each run (no mask: every query sees every cached position) and the
    pass's own new keys/values (causal among themselves), each call giving its log-sum-exp, and
    the partial outputs are merged exactly by their weights (what split-KV kernels do). Nothing
    is gathered or copied, and no mask is built; CPU only (``IN_PLACE_CONTEXT``)."""

    first: int  # offset of the row's tokens in the packed pass
    past: int  # cached positions before this pass
    count: int  # new tokens in this pass
    spans: list[tuple[int, int]]  # (flat arena slot, positions) of each run, in position order

    @classmethod
    def build(cls, blocks: list[int], first: int, past: int, count: int, block: int,
              max_runs: int | None = None) -> _Runs | None:
        used = np.asarray(blocks[:-(-past // block)], dtype=np.int64)  # blocks holding the past
        cuts = np.flatnonzero(np.diff(used) != 1) + 1
        if cuts.size + 1 > (MAX_RUNS if max_runs is None else max_runs):
            return None
        spans, position = [], 0
        for run in np.split(used, cuts) if used.size else []:
            length = min(int(run.size) * block, past - position)
            spans.append((int(run[0]) * block, length))
            position += length
        return cls(first, past, count, spans)

    def attend(self, arena: KVArena, layer: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, scaling: float | None) -> torch.Tensor:  # [count, Hq, D]
        _, q_heads, _, dim = query.shape
        kv_heads = key.shape[1]
        group, count = q_heads // kv_heads, self.count
        q = query[0, :, self.first:self.first + count]  # [Hq, C, D]
        outputs, lses = [], []
        # the new tokens among themselves: head h's queries over its own key/value head, causal
        new_k = key[0, :, None, self.first:self.first + count].expand(kv_heads, group, count, dim)
        new_v = value[0, :, None, self.first:self.first + count].expand(kv_heads, group, count, dim)
        o, lse = _attention_with_lse(q.reshape(kv_heads, group, count, dim), new_k, new_v, True,
                                     scaling)
        outputs.append(o.reshape(1, kv_heads, group * count, dim))
        lses.append(lse.reshape(1, kv_heads, group * count))
        grouped = q.reshape(1, kv_heads, group * count, dim)
        for start, length in self.spans:  # every cached position is visible to every query
            keys, values = arena.extent(layer, start, length)  # [length, Hkv, D] views
            o, lse = _attention_with_lse(grouped, keys.transpose(0, 1).unsqueeze(0),
                                         values.transpose(0, 1).unsqueeze(0), False, scaling)
            outputs.append(o)
            lses.append(lse)
        if len(outputs) == 1:
            merged = outputs[0]
        else:
            weights = torch.softmax(torch.stack(lses), dim=0)  # [parts, 1, Hkv, group * C]
            merged = (torch.stack(outputs) * weights.unsqueeze(-1)).sum(dim=0)
        return merged.reshape(q_heads, count, dim).transpose(0, 1)


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scaling: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and each query's log-sum-exp of its scores (CPU flash kernel; the same
    computed by matrix products where a torch build lacks it)."""
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and q.device.type == "cpu":
        out, lse = flash(q, k, v, 0.0, causal, scale=scaling)
        return out, lse
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    if causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, cols, dtype=torch.bool, device=q.device)
                                    .triu(cols - rows + 1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


def _block_table(tables: list[list[int]]) -> np.ndarray:  # [B, max blocks] int64, padded with 0
    widest = max(len(t) for t in tables)
    out = np.zeros((len(tables), widest), dtype=np.int64)
    for row, blocks in enumerate(tables):
        out[row, :len(blocks)] = blocks
    return out


def _ranges(counts: np.ndarray) -> np.ndarray:  # [sum(counts)]: 0..c-1 for each count
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _bucket(members: np.ndarray, counts: np.ndarray, past: np.ndarray, starts: np.ndarray,
            table: np.ndarray, block: int, group: int,
            device: torch.device) -> tuple[_Bucket, np.ndarray]:
    """The padded attention call of ``members``; also each member token's output row in it."""
    rows, width = members.size, int(counts[members].max())
    span = -(-int((past[members] + counts[members]).max()) // block)  # blocks per row
    blocks = table[members, :span] if table.shape[1] >= span else np.pad(
        table[members], ((0, 0), (0, span - table.shape[1])))
    c = np.arange(width)
    real = c[None, :] < counts[members, None]  # [R, C]
    queries = np.where(real, starts[members, None] + c[None, :], 0)  # [R, C]
    seen = np.where(real, past[members, None] + c[None, :], 0)  # [R, C] last visible position
    mask = np.arange(span * block)[None, None, :] <= seen[:, :, None]  # [R, C, L]
    mask = np.broadcast_to(mask[:, None, None], (rows, 1, group, width, span * block))
    local = (np.arange(rows)[:, None] * width + c[None, :])[real]  # [tokens of members]
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return _Bucket(rows, width, as_tensor(blocks.reshape(-1)), as_tensor(queries.reshape(-1)),
                   as_tensor(mask.reshape(rows, 1, group * width, span * block))), local


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
    kv.clear()
    return generated
