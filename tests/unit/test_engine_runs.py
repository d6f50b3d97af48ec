"""Long rows whose blocks lie in a few runs, attended in place run by run (``_Runs``), and the
arena's placement that keeps a growing session's blocks in few runs."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import verifier_worker.engine as engine_mod
from common.sampling import SamplingParams
from verifier_worker.engine import Draft, TargetEngine, VerifyRequest, generate_target_only
from verifier_worker.kv import ArenaShape, KVArena, KVCapacityError, SessionKV

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


def _deal(kvs: list[SessionKV], runs: int) -> None:
    """Re-deal the sessions' (equally many) blocks round by round: ``runs`` runs each."""
    per, pool = len(kvs[0].blocks), iter(sorted(b for kv in kvs for b in kv.blocks))
    tables: list[list[int]] = [[] for _ in kvs]
    for part in np.array_split(np.arange(per), runs):
        for table in tables:
            table.extend(next(pool) for _ in range(part.size))
    for kv, table in zip(kvs, tables, strict=True):
        kv.blocks[:] = table


def _counting(monkeypatch) -> dict[str, list[int]]:
    calls: dict[str, list[int]] = {"runs": [], "extent": []}
    for name, cls in (("runs", engine_mod._Runs), ("extent", engine_mod._Extent)):
        original = cls.attend

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name].append(self.first)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "attend", counted)
    return calls


def _reference(model, context: list[int], rows: int) -> torch.Tensor:  # the plain model's last rows
    with torch.inference_mode():
        return model(torch.tensor([context])).logits[0, -rows:]


@pytest.mark.parametrize("runs", [2, 5])
def test_rows_in_runs_match_the_plain_model(model, monkeypatch, runs: int) -> None:
    """Sessions whose cached blocks lie in several runs (the new tokens straddling a block edge in
    one of them): in place, run by run, the pass's logits are the plain model's."""
    monkeypatch.setattr(engine_mod, "IN_PLACE_CONTEXT", 64)
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(3)
    lengths = (300, 290, 40, 295)  # 290: the new tokens sit at 286-288, across a block edge
    contexts = [rng.integers(0, VOCAB, n).tolist() for n in lengths]
    engine = TargetEngine(model, VOCAB, kv_budget_tokens=4096)
    kvs = [SessionKV() for _ in contexts]
    for kv in kvs:
        engine.arena.allocate(kv, 320)
    _deal(kvs, runs)
    with torch.inference_mode():
        engine._forward([VerifyRequest(kv, ctx[:-3], Draft.empty(), SamplingParams(), 0)
                         for kv, ctx in zip(kvs, contexts, strict=True)])
        for kv in kvs:
            kv.truncate(kv.length - 1)
        calls["runs"].clear()
        logits = engine._forward([VerifyRequest(kv, ctx[:-2], _draft(ctx[-2:]), SamplingParams(), 1)
                                  for kv, ctx in zip(kvs, contexts, strict=True)])
    assert len(calls["runs"]) == 3 * model.config.num_hidden_layers  # the 40-token row gathers
    assert not calls["extent"]
    for i, ctx in enumerate(contexts):
        torch.testing.assert_close(logits[3 * i:3 * i + 3], _reference(model, ctx, 3),
                                   atol=1e-4, rtol=1e-4)


def test_a_prefill_over_scattered_blocks_attends_only_its_own_keys(model, monkeypatch) -> None:
    """A long first pass (nothing cached) over non-consecutive blocks: causal attention over the
    pass's own keys, no arena read; its logits are the plain model's."""
    monkeypatch.setattr(engine_mod, "IN_PLACE_CONTEXT", 64)
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(4)
    contexts = [rng.integers(0, VOCAB, n).tolist() for n in (150, 170)]
    engine = TargetEngine(model, VOCAB, kv_budget_tokens=4096)
    kvs = [SessionKV() for _ in contexts]
    for kv in kvs:
        engine.arena.allocate(kv, 176)
    _deal(kvs, 3)
    with torch.inference_mode():
        logits = engine._forward([VerifyRequest(kv, ctx[:-2], _draft(ctx[-2:]), SamplingParams(), 0)
                                  for kv, ctx in zip(kvs, contexts, strict=True)])
    assert len(calls["runs"]) == 2 * model.config.num_hidden_layers
    for i, ctx in enumerate(contexts):
        torch.testing.assert_close(logits[3 * i:3 * i + 3], _reference(model, ctx, 3),
                                   atol=1e-4, rtol=1e-4)


def test_rows_in_more_runs_than_max_runs_are_gathered(model, monkeypatch) -> None:
    monkeypatch.setattr(engine_mod, "IN_PLACE_CONTEXT", 64)
    monkeypatch.setattr(engine_mod, "MAX_RUNS", 3)
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(5)
    contexts = [rng.integers(0, VOCAB, 200).tolist() for _ in range(2)]
    engine = TargetEngine(model, VOCAB, kv_budget_tokens=4096)
    kvs = [SessionKV() for _ in contexts]
    for kv in kvs:
        engine.arena.allocate(kv, 208)
    _deal(kvs, 6)
    with torch.inference_mode():
        engine._forward([VerifyRequest(kv, ctx[:-3], Draft.empty(), SamplingParams(), 0)
                         for kv, ctx in zip(kvs, contexts, strict=True)])
        calls["runs"].clear()
        logits = engine._forward([VerifyRequest(kv, ctx[:-1], _draft(ctx[-1:]), SamplingParams(), 1)
                                  for kv, ctx in zip(kvs, contexts, strict=True)])
    assert not calls["runs"] and not calls["extent"]
    for i, ctx in enumerate(contexts):
        torch.testing.assert_close(logits[2 * i:2 * i + 2], _reference(model, ctx, 2),
                                   atol=1e-4, rtol=1e-4)


def test_greedy_rounds_over_runs_equal_target_only_decoding(model, monkeypatch) -> None:
    """Sessions decoding together (drafts partly right, partly wrong) with their caches in runs:
    every session's tokens are target-only greedy decoding's, token for token."""
    monkeypatch.setattr(engine_mod, "IN_PLACE_CONTEXT", 32)
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (40, 70, 9, 100)]
    engine = TargetEngine(model, VOCAB, kv_budget_tokens=8192)
    expected = [generate_target_only(engine, p, SamplingParams(), frozenset(), 40) for p in prompts]
    kvs = [SessionKV() for _ in prompts]
    contexts = [list(p) for p in prompts]
    for kv in kvs:
        engine.arena.allocate(kv, 160)
    _deal(kvs, 4)
    produced: list[list[int]] = [[] for _ in prompts]
    for seq in range(40):
        requests = []
        for i, (kv, context) in enumerate(zip(kvs, contexts, strict=True)):
            if len(produced[i]) >= 40:
                continue
            truth = expected[i][len(produced[i]):len(produced[i]) + 3]
            guess = [t if (seq + j) % 4 else (t + 1) % VOCAB for j, t in enumerate(truth)]
            requests.append((i, VerifyRequest(kv, context, _draft(guess), SamplingParams(), seq)))
        if not requests:
            break
        outcomes = engine.verify([r for _, r in requests])
        for (i, request), outcome in zip(requests, outcomes, strict=True):
            new = [int(t) for t in request.draft.token_ids[:outcome.accepted]] + [outcome.token]
            produced[i].extend(new)
            contexts[i].extend(new)
    assert calls["runs"]
    for i in range(len(prompts)):
        assert produced[i][:40] == expected[i]


SHAPE = ArenaShape(layers=1, kv_heads=1, head_dim=2)


def _runs(kv: SessionKV) -> int:
    return 1 + int(np.count_nonzero(np.diff(kv.blocks) != 1)) if kv.blocks else 0


def test_sessions_growing_together_keep_their_blocks_consecutive() -> None:
    arena = KVArena(SHAPE, 4096, torch.float32, torch.device("cpu"), block_tokens=16)
    kvs = [SessionKV() for _ in range(8)]
    for kv in kvs:
        arena.allocate(kv, 100)  # a prompt: several blocks at once, placed with room to grow
    for end in range(116, 400, 16):
        for kv in kvs:
            arena.allocate(kv, end)  # one block each in turn, as a pool's sessions grow
    assert [_runs(kv) for kv in kvs] == [1] * 8
    assert len({b for kv in kvs for b in kv.blocks}) == sum(len(kv.blocks) for kv in kvs)


def test_placement_keeps_the_free_count_and_ownership_exact() -> None:
    rng = np.random.default_rng(7)
    arena = KVArena(SHAPE, 2048, torch.float32, torch.device("cpu"), block_tokens=16)
    live: list[SessionKV] = []
    for _ in range(600):
        if live and rng.random() < 0.2:
            live.pop(int(rng.integers(len(live)))).clear()
        elif rng.random() < 0.3 or not live:
            kv = SessionKV()
            try:
                arena.allocate(kv, int(rng.integers(1, 200)))
                live.append(kv)
            except KVCapacityError:
                kv.clear()
        else:
            kv = live[int(rng.integers(len(live)))]
            with contextlib.suppress(KVCapacityError):
                arena.allocate(kv, kv.size + int(rng.integers(1, 40)))
        held = [b for kv in live for b in kv.blocks]
        assert len(held) == len(set(held))
        assert arena.free_tokens == (arena.num_blocks - len(held)) * arena.block_tokens
    for kv in live:
        kv.clear()
    assert arena.free_tokens == arena.budget_tokens
