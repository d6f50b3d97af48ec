"""The 4-bit draft's layers (common/int4_draft.py): exact grids, the kernels' products, the swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common import int4_draft
from common.int4_draft import (
    ACTIVATIONS,
    GROUP_SIZE,
    Int4Linear,
    Int8RowLinear,
    group_grids,
    int4_kernels_available,
    use_int4_weights,
)

pytestmark = pytest.mark.skipif(not int4_kernels_available(), reason="this torch lacks the int4 CPU kernels")


def grid_weight(rows: int, inputs: int, seed: int = 0) -> torch.Tensor:
    """A weight whose every group spans the 16 levels of its own grid (a dequantised Q4_1 layer's)."""
    generator = torch.Generator().manual_seed(seed)
    groups = inputs // GROUP_SIZE
    codes = torch.randint(0, 16, (rows, groups, GROUP_SIZE), generator=generator)
    codes[..., 0], codes[..., 1] = 0, 15  # each group holds its grid's ends, as Q4_1's blocks do
    # scales and minima that bfloat16 holds exactly, so the re-packed layer is the same layer
    step = (torch.randint(1, 64, (rows, groups, 1), generator=generator) / 1024).to(ACTIVATIONS).float()
    low = (-8 * step * torch.randint(1, 3, (rows, groups, 1), generator=generator)).to(ACTIVATIONS).float()
    return (low + codes * step).reshape(rows, inputs)


def bf16_inputs(rows: int, inputs: int) -> torch.Tensor:
    return torch.randn(rows, inputs, generator=torch.Generator().manual_seed(1)).to(ACTIVATIONS).float()


def test_a_weight_on_its_grids_is_recovered_exactly() -> None:
    weight = grid_weight(48, 128)
    codes, scale, zero = group_grids(weight)
    assert codes.min() >= 0 and codes.max() <= 15
    back = ((codes.reshape(48, -1, GROUP_SIZE) - 8) * scale[..., None] + zero[..., None]).reshape(48, 128)
    assert torch.allclose(back, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_the_int4_product_is_the_float_product_of_the_same_grid_weight(rows: int) -> None:
    weight, x = grid_weight(64, 256), bf16_inputs(rows, 256)
    with torch.inference_mode():
        got = Int4Linear.from_weight(weight)(x)
    want = x.double() @ weight.double().T
    # bfloat16 in, float32 accumulation: a few units in bfloat16's last place of the largest term
    assert got.dtype == torch.float32 and got.shape == (rows, 64)
    assert torch.allclose(got.double(), want, rtol=0.02, atol=0.05)


def test_the_int8_head_is_within_one_level_per_weight() -> None:
    weight, x = torch.randn(96, 64, generator=torch.Generator().manual_seed(2)), bf16_inputs(3, 64)
    with torch.inference_mode():
        got = Int8RowLinear(weight)(x)
    level = weight.abs().amax(1) / 127  # [96]: one level of each row
    bound = 0.5 * level * x.abs().sum(1, keepdim=True) + 0.05  # [3, 96]: half a level per weight
    assert (got - x @ weight.T).abs().le(bound).all()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_every_linear_layer_is_swapped_and_the_embedding_kept() -> None:
    model = tiny_llama()
    embedding = model.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.inference_mode():
        before = model(ids).logits
        assert use_int4_weights(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
        after = model(ids).logits
    assert isinstance(model.get_output_embeddings(), Int8RowLinear)
    mlp = model.model.layers[0].mlp
    assert all(isinstance(layer, Int4Linear) for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.95
    assert use_int4_weights(model) == 0  # idempotent


def test_other_dtypes_and_a_torch_without_the_kernels_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_int4_weights(tiny_llama().to(torch.float64)) == 0
    monkeypatch.setattr(int4_draft, "int4_kernels_available", lambda: False)
    model = tiny_llama()
    assert use_int4_weights(model) == 0
    assert type(model.get_output_embeddings()) is nn.Linear
