"""A draft cut from a target (``specd train-draft --from-target``) on a tiny random Llama.

The draft keeps chosen layers of the target (copied), its embedding (frozen) and a reduced head
over a subset of ids; the head's full-vocabulary logits are -inf outside the subset; a saved
folder loads through ``load_causal_lm`` with the reduced head; the shipped form (no embedding)
assembles back into the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import reduced_draft
from common.models import load_causal_lm
from common.reduced_draft import SUBSET_FILE, ReducedHead, export_shipped, save_full_folder
from specd.draft_distil import batch_loss, draft_from_target, parse_layers, summarise_matches
from specd.draft_teacher import ChatPrompt, TeacherData
from specd.train_draft import TrainDraftError
from tests.tiny_models import build_tokenizer, random_model


@pytest.fixture(scope="module")
def pair() -> tuple:
    tokenizer = build_tokenizer(96)
    target = random_model(tokenizer, seed=3, hidden=32, layers=4)
    return tokenizer, target


def test_layers_embedding_and_reduced_head_come_from_the_target(pair: tuple) -> None:
    _, target = pair
    vocab = target.config.vocab_size
    ids = list(range(0, vocab, 3))
    draft = draft_from_target(target, [0, 3], ids)
    assert draft.config.num_hidden_layers == 2 and not draft.config.tie_word_embeddings
    for mine, theirs in ((0, 0), (1, 3)):
        for name, value in target.model.layers[theirs].state_dict().items():
            assert torch.equal(draft.model.layers[mine].state_dict()[name], value)
    assert torch.equal(draft.model.embed_tokens.weight, target.model.embed_tokens.weight)
    assert not draft.model.embed_tokens.weight.requires_grad
    head = draft.get_output_embeddings()
    assert isinstance(head, ReducedHead)
    assert torch.equal(head.weight, target.lm_head.weight[torch.tensor(ids)])
    logits = draft(input_ids=torch.tensor([[5, 7, 9]])).logits
    assert logits.shape[-1] == vocab
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[torch.tensor(ids)] = False
    assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()


def test_every_layer_and_the_whole_vocabulary_is_the_target_itself(pair: tuple) -> None:
    _, target = pair
    draft = draft_from_target(target, [0, 1, 2, 3], list(range(target.config.vocab_size)))
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    with torch.no_grad():
        torch.testing.assert_close(draft(input_ids=ids).logits, target(input_ids=ids).logits)


def test_a_saved_folder_loads_with_the_reduced_head(pair: tuple, tmp_path: Path) -> None:
    tokenizer, target = pair
    ids = list(range(0, target.config.vocab_size, 2))
    draft = draft_from_target(target, [0, 2], ids).eval()
    save_full_folder(draft, tokenizer, tmp_path / "draft")
    assert json.loads((tmp_path / "draft" / SUBSET_FILE).read_text())["token_ids"] == ids
    loaded = load_causal_lm(str(tmp_path / "draft"))
    assert isinstance(loaded.model.get_output_embeddings(), ReducedHead)
    assert loaded.vocab_size == target.config.vocab_size
    x = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=x).logits, draft(input_ids=x).logits)


def test_the_shipped_form_assembles_into_the_same_draft(pair: tuple, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer, target = pair
    draft = draft_from_target(target, [1, 3], list(range(0, target.config.vocab_size, 4))).eval()
    save_full_folder(draft, tokenizer, tmp_path / "full")
    export_shipped(draft, tmp_path / "full", tmp_path / "shipped", {"embedding_tensor": "token_embd.weight"},
                   dtype=torch.float32)
    assert "model.embed_tokens.weight" not in _keys(tmp_path / "shipped" / "draft.safetensors")
    embedding = target.model.embed_tokens.weight.detach().clone()
    monkeypatch.setattr(reduced_draft, "gguf_tensor", lambda _path, _name: embedding)
    reduced_draft._assemble(tmp_path / "shipped", {"embedding_tensor": "token_embd.weight"},
                            tmp_path / "x.gguf", _mkdir(tmp_path / "assembled"))
    tokenizer.save_pretrained(tmp_path / "assembled")
    loaded = load_causal_lm(str(tmp_path / "assembled"))
    x = torch.tensor([[2, 7, 1, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=x).logits, draft(input_ids=x).logits)


def test_one_distillation_step_lowers_the_loss(pair: tuple) -> None:
    _, target = pair
    vocab = target.config.vocab_size
    ids = list(range(vocab // 2))
    draft = draft_from_target(target, [0], ids)
    remap = torch.full((vocab,), -1, dtype=torch.long)
    remap[torch.tensor(ids)] = torch.arange(len(ids))
    paths = [[3, 4, 5, 6, 70], [8, 9, 10]]  # 70: outside the subset (no loss on it)
    top_ids = [torch.randint(0, vocab, (len(p), 4), dtype=torch.int32) for p in paths]
    data = TeacherData([ChatPrompt("t", "t", str(i), [1, 2, 3]) for i in range(2)], paths, top_ids,
                       [torch.randn(len(p), 4).half() for p in paths])
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    first = batch_loss(draft, data, [0, 1], 2, remap, 0.5)
    first.backward()
    optimizer.step()
    assert torch.isfinite(first)
    assert batch_loss(draft, data, [0, 1], 2, remap, 0.5).item() < first.item()


def test_acceptance_counts_rounds_like_a_greedy_session() -> None:
    figures = summarise_matches([[True, True, False, True]], gammas=(2,))
    # round 1: 2 drafted and accepted, the target's token at position 2; round 2: 1 drafted, accepted
    assert figures["agreement"] == 0.75
    assert figures["gamma_2"] == {"tokens_per_round": 2.0, "acceptance": 1.0}


def test_layer_choice_is_checked() -> None:
    assert parse_layers("0,1,-1", 30) == [0, 1, 29]
    with pytest.raises(TrainDraftError, match=r"0\.\.29"):
        parse_layers("0,30", 30)


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
