"""``specd train-draft --feature``'s parts on the tiny target: answers with their features, the
unrolled loss, the held-out score (no Redis, no real model)."""

from __future__ import annotations

import torch

from common.feature_draft import FeatureDraft, FeatureDraftConfig
from common.models import load_causal_lm
from specd.draft_feature import (
    FeatureData,
    answer_with_features,
    batch_loss,
    flatten,
    score,
    vocabulary_subset,
)
from specd.draft_teacher import ChatPrompt


def test_answers_carry_the_feature_behind_every_token(tiny_pair) -> None:
    loaded = load_causal_lm(tiny_pair["target"])
    prompts = [loaded.tokenizer.encode(p) for p in ("def add(a, b):", "import os")]
    answers = answer_with_features(loaded.model, prompts, 6, 0, frozenset())
    for prompt, (path, features) in zip(prompts, answers, strict=True):
        assert features.shape == (len(path), loaded.model.config.hidden_size)
        # the first feature is the prompt's last position: its logits gave the first token
        with torch.no_grad():
            hidden = loaded.model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(features[0].float(), hidden, atol=2e-2, rtol=1e-2)


def test_training_steps_lower_the_loss_and_scores_are_shares(tiny_pair) -> None:
    loaded = load_causal_lm(tiny_pair["target"])
    texts = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    answers = answer_with_features(loaded.model, prompts, 12, 0, frozenset())
    data = FeatureData([ChatPrompt("specbench", "qa", str(i), p) for i, p in enumerate(prompts)],
                       [a[0] for a in answers], [a[1] for a in answers])
    flat = flatten(data, [0, 1, 2, 3])
    vocab = loaded.model.config.vocab_size
    subset = torch.tensor(vocabulary_subset(data, [0, 1, 2, 3], 64, vocab, frozenset({1})))
    assert len(subset) == 64 and 1 in subset.tolist()
    embedding = loaded.model.get_input_embeddings().weight.detach().float()
    torch.manual_seed(0)
    config = FeatureDraftConfig(hidden_size=embedding.shape[1], intermediate_size=64, layers=1,
                                vocab_size=vocab)
    draft = FeatureDraft(config, embedding, loaded.model.model.norm.weight.detach().float(), subset)
    remap = torch.full((vocab,), -1, dtype=torch.long)
    remap[subset] = torch.arange(len(subset))
    rows = loaded.model.get_output_embeddings().weight.detach().float()[subset]
    anchors = torch.nonzero(flat.left >= 1).squeeze(1)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = batch_loss(draft, flat, anchors, 3, rows, remap)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    scores = score(draft, flat)
    assert 0.0 <= scores["acceptance_gamma4"] <= 1.0 and len(scores["step_accuracy"]) == 5
    assert scores["anchors"] == int(anchors.numel())
