"""The compact 4-bit Llama decoder (common/int4_llama.py) against transformers' forward of the same model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.int4_draft import Int4Linear, int4_kernels_available, stack_int4, use_int4_weights
from common.int4_llama import FIRST_CAPACITY, Int4Llama

pytestmark = pytest.mark.skipif(not int4_kernels_available(), reason="this torch lacks the int4 CPU kernels")

IDS = [5, 17, 99, 3, 42, 7, 250, 11]


def four_bit_llama(kv_heads: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    use_int4_weights(model)
    return model


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to the last bits: the two paths round activations to bfloat16 at different points."""
    return bool((got - want).abs().max() <= 0.02 * want.abs().max())


@pytest.mark.parametrize("kv_heads", [2, 4])  # 2: q, k, v run apart (32-row k/v); 4: one stacked product
def test_each_step_gives_transformers_logits_for_the_same_model(kv_heads: int) -> None:
    model = four_bit_llama(kv_heads)
    decoder = Int4Llama.of(model)
    assert decoder is not None
    with torch.inference_mode():
        want = model(torch.tensor([IDS])).logits[0]  # [T, V]
    cache = decoder.new_cache()
    assert close(decoder.step(cache, IDS[:5]), want[4])
    for position in range(5, len(IDS)):  # one token at a time on top of the cache
        assert close(decoder.step(cache, [IDS[position]]), want[position])
    assert cache.length == len(IDS)


def test_a_truncated_cache_resumes_where_it_was_cut() -> None:
    decoder = Int4Llama.of(four_bit_llama())
    assert decoder is not None
    whole, cut = decoder.new_cache(), decoder.new_cache()
    want = decoder.step(whole, IDS)
    decoder.step(cut, [*IDS[:3], 1, 2, 3])  # a rejected tail, then rolled back
    cut.length = 3
    assert torch.equal(decoder.step(cut, IDS[3:]), want)


def test_the_buffer_grows_past_its_first_capacity() -> None:
    model = four_bit_llama()
    decoder = Int4Llama.of(model)
    assert decoder is not None
    ids = [(7 * i) % 250 + 3 for i in range(FIRST_CAPACITY + 20)]
    cache = decoder.new_cache()
    decoder.step(cache, ids[:FIRST_CAPACITY - 2])
    got = decoder.step(cache, ids[FIRST_CAPACITY - 2:])
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0, -1]
    assert cache.keys.shape[2] >= len(ids) and close(got, want)


def test_stacking_happens_only_on_whole_tiles() -> None:
    layers = [Int4Linear.from_weight(torch.randn(rows, 64)) for rows in (64, 128)]
    stacked = stack_int4(layers)
    assert isinstance(stacked, Int4Linear) and stacked.out_features == 192
    x = torch.randn(2, 64)
    assert torch.equal(stacked(x), torch.cat([layer(x) for layer in layers], -1))
    ragged = [Int4Linear.from_weight(torch.randn(rows, 64)) for rows in (64, 32)]
    assert isinstance(stack_int4(ragged), tuple)


def test_anything_but_a_four_bit_llama_keeps_transformers_forward() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    float_model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=4)).eval()
    assert Int4Llama.of(float_model) is None
    assert Int4Llama.of(object()) is None
