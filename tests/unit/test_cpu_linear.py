"""common.cpu_linear: oneDNN's linear in place of MKL's on CPU float32 models, same products."""

from __future__ import annotations

import pytest
import torch

import common.cpu_linear as cpu_linear
from common.cpu_linear import OneDNNLinear, use_onednn_linears

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_linear_available(),
                                  reason="this torch has no usable oneDNN linear")


class Tied(torch.nn.Module):
    """An embedding tied to its output layer, a large and a small layer, as a small LM has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(600, 256)
        self.up = torch.nn.Linear(256, 768)  # 196,608 weights, 256 inputs: oneDNN at every row count
        self.down = torch.nn.Linear(768, 256, bias=False)
        self.small = torch.nn.Linear(256, 64)  # 16,384 weights: MKL below prefill sizes
        self.head = torch.nn.Linear(256, 600, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h) + self.small(h).sum(-1, keepdim=True)


def model() -> Tied:
    torch.manual_seed(0)
    return Tied().eval()


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_same_products_as_torchs_own_linear(rows: int) -> None:
    reference, converted = model(), model()
    assert use_onednn_linears(converted) == 4
    ids = torch.randint(0, 600, (1, rows), generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        # float32 both ways; only the order of the sums differs
        torch.testing.assert_close(converted(ids), reference(ids), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_keeps_parameters_ties_hooks_and_types() -> None:
    m = model()
    parameters = {name: p for name, p in m.named_parameters()}
    seen: list[int] = []
    m.head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[1]))
    use_onednn_linears(m)
    assert dict(m.named_parameters()) == parameters
    assert m.head.weight is m.embed.weight
    assert all(isinstance(layer, torch.nn.Linear) and type(layer) is OneDNNLinear
               for layer in (m.up, m.down, m.small, m.head))
    with torch.inference_mode():
        m(torch.tensor([[1, 2, 3]]))
    assert seen == [3]
    assert use_onednn_linears(m) == 0  # idempotent


@needs_onednn
def test_chooses_the_kernel_by_shape_and_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    m = model()
    use_onednn_linears(m)
    calls: list[int] = []
    real = cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda x, w, b: calls.append(w.shape[0]) or real(x, w, b))
    with torch.inference_mode():
        m.small(torch.ones(1, 2, 256))  # small weight, decode rows: MKL
        assert calls == []
        m.small(torch.ones(1, cpu_linear.PREFILL_ROWS, 256))  # small weight, prefill rows: oneDNN
        m.up(torch.ones(1, 1, 256))  # wide and large: oneDNN from one row
    assert calls == [64, 768]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_are_left_alone(dtype: torch.dtype) -> None:
    m = model().to(dtype)
    assert use_onednn_linears(m) == 0
    assert type(m.up) is torch.nn.Linear


def test_nothing_changes_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda: False)
    m = model()
    assert use_onednn_linears(m) == 0
    assert type(m.up) is torch.nn.Linear
