"""A draft that drafts from the target's own hidden state (feature drafting, after EAGLE/Hydra).

A separate small draft model has to re-read the whole context to guess the next token, and a
small one guesses poorly. The target has already read it: the hidden state its output layer
reads at a position (the *feature*) holds what the target knows there. The verifier returns,
with each verdict, the feature of the position that produced the round's last committed token;
this draft then predicts the following features one step at a time, each from the previous one
and the token it produced, and scores each predicted feature with a reduced-vocabulary head:

    terms (H: hidden size, K: subset size, V: the vocabulary)
      f      [B, H]  a feature: the target's final-norm hidden state (its lm_head's input)
      t      [B]     the token produced at that position (by the target, or drafted)
      e      [B, H]  the target's embedding of t (frozen, the target's own table)
      step   f' = norm_out(x_L),  x_0 = fc([norm_f(f); norm_e(e)]),  x_l = x_{l-1} + mlp_l(norm_l(x_{l-1}))
      logits head(f') over K ids (rows initialised from the target's tied output layer), the
             other V - K ids -inf: q is explicit and sent, so verification stays exact.

The state between rounds is one feature and its position: no cache, no rollback, so a rejected
draft costs nothing to undo. Drafting needs a feature for the current context; a session's first
round (and any round after a context the verdicts did not describe) drafts nothing, and the
verifier's pass then produces one token and the feature.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.reduced_draft import ReducedHead

FEATURE_META = "specd_feature_draft.json"
FEATURE_WEIGHTS = "feature_draft.safetensors"
SHIPPED_FEATURE_DRAFTS: dict[str, Path] = {}
"""Feature drafts shipped in common/assets, by name: none yet (see docs/drafters.md, "Feature drafts")."""


@dataclass(frozen=True)
class FeatureDraftConfig:
    hidden_size: int
    intermediate_size: int
    layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5


class _Mlp(nn.Module):
    """A gated (SiLU) MLP, as in the target's own layers."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class FeatureDraft(nn.Module):
    """One drafting step: (feature, token) -> (next feature, subset logits)."""

    def __init__(self, config: FeatureDraftConfig, embedding: torch.Tensor, final_norm: torch.Tensor,
                 token_ids: torch.Tensor) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.embed = nn.Embedding.from_pretrained(embedding, freeze=True)  # the target's: not shipped
        self.norm_f = nn.RMSNorm(hidden, eps=eps)
        self.norm_e = nn.RMSNorm(hidden, eps=eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, eps=eps) for _ in range(config.layers))
        self.mlps = nn.ModuleList(_Mlp(hidden, config.intermediate_size) for _ in range(config.layers))
        self.norm_out = nn.RMSNorm(hidden, eps=eps)
        with torch.no_grad():
            self.norm_out.weight.copy_(final_norm)  # predicted features live where the target's do
        self.head = ReducedHead(embedding[token_ids.long()].clone(), token_ids, config.vocab_size)

    def step(self, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, H]
        """The predicted feature of the position after ``tokens`` (which ``feature`` produced)."""
        x = self.fc(torch.cat([self.norm_f(feature), self.norm_e(self.embed(tokens))], dim=-1))
        for norm, mlp in zip(self.norms, self.mlps, strict=True):
            x = x + mlp(norm(x))
        return self.norm_out(x)

    def shipped_state(self) -> dict[str, torch.Tensor]:
        """Its own tensors: everything but the target's embedding table."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}
        state["head.token_ids"] = self.head.token_ids.to(torch.int32)
        return state


def feature_draft_folder(name: str) -> Path | None:
    """The folder of the feature draft ``name`` (shipped by name, or any folder holding one)."""
    if name in SHIPPED_FEATURE_DRAFTS:
        return SHIPPED_FEATURE_DRAFTS[name]
    path = Path(name).expanduser()
    return path if (path / FEATURE_META).is_file() else None


def target_embedding(folder: Path, meta: dict[str, Any], sha256: Any, resolve: Any) -> torch.Tensor:
    """The target's embedding table [V, H] (float32), from where the draft's record says:

    * ``target_package``/``target_file``/``embedding_tensor``: the target's GGUF file inside its
      installed package, checked against ``target_sha256`` first (``sha256``: path -> hex digest);
    * ``embedding_model``: a model name (``resolve``: name -> folder) whose ``model.safetensors``
      holds ``model.embed_tokens.weight`` (drafts for the bundled tiny target, in tests).
    """
    from common.reduced_draft import gguf_tensor, target_gguf

    if "embedding_model" in meta:
        from safetensors import safe_open

        with safe_open(str(Path(resolve(meta["embedding_model"])) / "model.safetensors"), "pt") as f:
            return f.get_tensor("model.embed_tokens.weight").float()
    path = target_gguf(meta)
    if sha256(path) != meta["target_sha256"]:
        raise ValueError(f"{path} is not the file the feature draft in {folder} was trained for "
                         "(SHA-256 differs): reinstall the target's package at the pinned version")
    return gguf_tensor(path, meta["embedding_tensor"])


def save_feature_draft(draft: FeatureDraft, out: Path, meta: dict[str, Any],
                       dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if k == "head.token_ids" else v.detach().to(dtype)).contiguous()
               for k, v in draft.shipped_state().items()}
    save_file(tensors, str(out / FEATURE_WEIGHTS), metadata={"format": "pt"})
    record = {"config": asdict(draft.config), **meta}
    (out / FEATURE_META).write_text(json.dumps(record, indent=1) + "\n")


def load_feature_draft(folder: Path, embedding: torch.Tensor) -> FeatureDraft:
    """The draft in ``folder`` around the target's ``embedding`` [V, H] (float32)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / FEATURE_META).read_text())
    config = FeatureDraftConfig(**meta["config"])
    tensors = load_file(str(folder / FEATURE_WEIGHTS))
    token_ids = tensors.pop("head.token_ids").long()
    draft = FeatureDraft(config, embedding.float(), tensors["norm_out.weight"].float(), token_ids)
    missing, unexpected = draft.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if unexpected or [k for k in missing if not k.startswith("embed.")]:
        raise ValueError(f"{folder} does not hold a feature draft of this shape "
                         f"(missing {missing}, unexpected {unexpected})")
    return draft.eval()
