"""Per-session KV cache storage for the target model.

Each session keeps, per layer, key and value buffers ``[kv_heads, capacity, head_dim]`` that
grow by doubling, so appending a round's tokens is amortised O(new tokens) and rolling back is
just moving ``length``. A batched forward pass copies the used prefixes into a padded batch.
"""

from __future__ import annotations

import torch


class SessionKV:
    """The target's cache for one session: positions ``0 .. length - 1`` are valid."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per layer [kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the valid prefix of one layer: ``[kv_heads, length, head_dim]`` each."""
        return self.keys[index][:, : self.length], self.values[index][:, : self.length]

    def append(self, new_keys: list[torch.Tensor], new_values: list[torch.Tensor]) -> None:
        """Append per-layer ``[kv_heads, n, head_dim]`` tensors after the valid prefix."""
        self.ensure_layers(len(new_keys), new_keys[0])
        count = new_keys[0].shape[1]
        if count == 0:
            return
        self._reserve(self.length + count, new_keys[0])
        end = self.length + count
        for layer, (k, v) in enumerate(zip(new_keys, new_values, strict=True)):
            self.keys[layer][:, self.length: end] = k
            self.values[layer][:, self.length: end] = v
        self.length = end

    def truncate(self, keep: int) -> None:
        """Roll back to the first ``keep`` positions (a no-op if already shorter)."""
        self.length = min(self.length, keep)

    def clear(self) -> None:
        self.keys, self.values, self.length = [], [], 0

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        heads, _, dim = like.shape
        for layer in range(len(self.keys)):
            for buffers in (self.keys, self.values):
                grown = like.new_zeros(heads, capacity, dim)
                grown[:, : self.length] = buffers[layer][:, : self.length]
                buffers[layer] = grown

    def ensure_layers(self, count: int, like: torch.Tensor) -> None:
        """Create empty buffers for ``count`` layers on first use."""
        if self.keys:
            return
        heads, _, dim = like.shape
        self.keys = [like.new_zeros(heads, 64, dim) for _ in range(count)]
        self.values = [like.new_zeros(heads, 64, dim) for _ in range(count)]
