"""Attention over views of consecutive blocks (batch 1, long rows) against the gathered batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import verifier_worker.engine as engine_mod
from common.sampling import SamplingParams
from verifier_worker.engine import Draft, TargetEngine, VerifyRequest
from verifier_worker.kv import SessionKV

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def _draft(tokens: list[int]) -> Draft:
    draft = Draft.empty()
    draft.token_ids = np.asarray(tokens, dtype=np.uint32)
    return draft


def _pass_logits(model, contexts: list[list[int]], interleave: bool, in_place_from: int,
                 monkeypatch) -> list[torch.Tensor]:
    """Prefill every context (all but its last 3 tokens), then one pass feeding 1 + a 2-token
    draft each; returns that pass's logits per session."""
    monkeypatch.setattr(engine_mod, "IN_PLACE_CONTEXT", in_place_from)
    original, calls = engine_mod._Extent.attend, []

    def counted(self, *args, **kwargs):
        calls.append(self.first)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_mod._Extent, "attend", counted)
    engine = TargetEngine(model, VOCAB, kv_budget_tokens=4096)
    kvs = [SessionKV() for _ in contexts]
    if interleave:  # grow the sessions block by block in turn: nobody's blocks are consecutive
        for end in range(16, 1024, 16):
            for kv, ctx in zip(kvs, contexts, strict=True):
                if end <= len(ctx):
                    engine.arena.allocate(kv, end)
    prefill = [VerifyRequest(kv, ctx[:-3], Draft.empty(), SamplingParams(), 0)
               for kv, ctx in zip(kvs, contexts, strict=True)]
    with torch.inference_mode():
        engine._forward(prefill)
        for kv in kvs:
            kv.truncate(kv.length - 1)  # the last prompt token is fed with the draft
        step = [VerifyRequest(kv, ctx[:-2], _draft(ctx[-2:]), SamplingParams(), 1)
                for kv, ctx in zip(kvs, contexts, strict=True)]
        calls.clear()
        logits = engine._forward(step)
    expected = 0 if interleave and len(contexts) > 1 else sum(
        len(c) - 2 >= in_place_from or len(contexts) == 1 for c in contexts)
    assert len(calls) == expected * model.config.num_hidden_layers  # the path under test ran
    return [logits[3 * i:3 * i + 3].clone() for i in range(len(contexts))]


def _reference(model, context: list[int]) -> torch.Tensor:  # the plain model's last 3 rows
    with torch.inference_mode():
        return model(torch.tensor([context])).logits[0, -3:]


def test_in_place_rows_match_the_gathered_pass_and_the_plain_model(model, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    contexts = [rng.integers(0, VOCAB, n).tolist() for n in (700, 40, 600, 530)]
    in_place = _pass_logits(model, contexts, False, 512, monkeypatch)
    gathered = _pass_logits(model, contexts, False, 10**9, monkeypatch)
    shuffled = _pass_logits(model, contexts, True, 512, monkeypatch)  # falls back to gathering
    for ctx, a, b, c in zip(contexts, in_place, gathered, shuffled, strict=True):
        reference = _reference(model, ctx)
        for got in (a, b, c):
            torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


def test_batch_one_in_place_matches_the_plain_model(model, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    for n in (5, 17, 300):
        context = rng.integers(0, VOCAB, n).tolist()
        (logits,) = _pass_logits(model, [context], False, 512, monkeypatch)
        torch.testing.assert_close(logits, _reference(model, context), atol=1e-4, rtol=1e-4)
