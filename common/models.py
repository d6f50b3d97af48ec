"""Loading Hugging Face causal LMs (folder, hub id or the bundled pair) and tokenizer checks."""

from __future__ import annotations

import hashlib
import inspect
import json
import socket
import urllib.parse
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "tiny_pair"

DTYPES = {
    "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64,
}


class ModelLoadError(Exception):
    """A model or tokenizer could not be loaded; the message names the model."""


class TokenizerMismatchError(Exception):
    """Draft and target tokenizers disagree on the ids that would be exchanged."""


def resolve_model_path(name: str) -> str:
    """Map ``bundled:target`` / ``bundled:draft`` to the shipped folders; check local paths.

    A name that looks like a path (absolute, ``./``, ``../``, ``~``) or names an existing folder
    must be a model folder; anything else is a Hugging Face hub id.
    """
    if name.startswith(BUNDLED_PREFIX):
        folder = BUNDLED_DIR / name[len(BUNDLED_PREFIX):]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"bundled model {name!r} is missing at {folder}; the bundled "
                                 "pair is bundled:target and bundled:draft")
        return str(folder)
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or path.is_dir():
        if not path.exists():
            raise ModelLoadError(f"model folder {name} does not exist")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} is not a model folder (no config.json in it); give a folder "
                                 "written by save_pretrained, a hub id or bundled:target/bundled:draft")
        return str(path)
    return name


def hub_options(name: str) -> dict[str, Any]:
    """``from_pretrained`` options for ``name``: a hub id the hub cannot serve now loads from the
    local cache (``local_files_only``) or fails at once with what to do. Without this an offline
    machine retried for about a minute, printing each warning twice (tokenizer, then model)."""
    if Path(resolve_model_path(name)).is_dir():  # a folder (or the bundled pair): no hub involved
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    if not reason:
        return {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"cannot load the model {name!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be used "
        f"({reason}) and the model is not in the local cache; download it once with network access, "
        "or give a local folder")


@cache
def _hub_unreachable(endpoint: str, timeout_s: float = 3.0) -> str:
    """'' when the hub's host takes a TCP connection (one try, once per process), else why not."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return ""
    except OSError as exc:
        return str(exc) or type(exc).__name__


@dataclass
class LoadedModel:
    name: str
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # a transformers tokenizer
    device: torch.device
    vocab_size: int  # rows of the output layer: the largest id + 1 the model can score
    fingerprint: str
    eos_token_ids: frozenset[int]


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code,
                                             **hub_options(name))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {_first_line(exc)}") from exc


def load_causal_lm(
    name: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> LoadedModel:
    """Load any Hugging Face causal LM (local folder written by save_pretrained, or hub id)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # workers log JSON lines; no progress bars on stderr
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(name, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **hub_options(name)
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model {name!r}: {_first_line(exc)}") from exc
    torch_device = torch.device(device)
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub types .to narrowly
    model.eval()
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, device=torch_device,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        fingerprint=vocab_fingerprint(tokenizer), eos_token_ids=eos_token_ids(model, tokenizer),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def vocab_fingerprint(tokenizer: Any) -> str:
    """A stable hash of the token -> id map (including added tokens)."""
    return _fingerprint_of(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False))


@cache
def _fingerprint_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_tokenizers_compatible(draft: LoadedModel | Any, target: LoadedModel | Any,
                                draft_name: str = "", target_name: str = "") -> None:
    """Raise ``TokenizerMismatchError`` unless both map every shared id to the same token.

    The draft's ids must all exist in the target with the same meaning; the target may have
    extra (e.g. added special) tokens the draft never produces.
    """
    draft_tok: Any = getattr(draft, "tokenizer", draft)
    target_tok: Any = getattr(target, "tokenizer", target)
    draft_name = draft_name or getattr(draft, "name", "draft")
    target_name = target_name or getattr(target, "name", "target")
    target_vocab = target_tok.get_vocab()
    mismatched = [tok for tok, idx in draft_tok.get_vocab().items() if target_vocab.get(tok) != idx]
    if mismatched:
        sample = ", ".join(repr(t) for t in sorted(mismatched)[:5])
        raise TokenizerMismatchError(
            f"tokenizers of draft {draft_name!r} and target {target_name!r} are incompatible: "
            f"{len(mismatched)} draft tokens map to other ids in the target (e.g. {sample})"
        )


_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(model_class: type) -> str:
    """``cache`` (transformers 5.x) or ``past_key_values`` (older; removed in 5.40)."""
    name = _CACHE_ARGUMENT.get(model_class)
    if name is None:
        forward = model_class.forward  # type: ignore[attr-defined]
        name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        _CACHE_ARGUMENT[model_class] = name
    return name


def forward_with_cache(model: Any, kv_cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """One cached forward on any supported transformers version: (output, updated cache)."""
    out = model(**inputs, use_cache=True, **{_cache_argument(type(model)): kv_cache})
    updated = getattr(out, "cache", None)
    return out, updated if updated is not None else out.past_key_values


def crop_cache(cache: Any, keep: int) -> None:
    """Drop cached positions past ``keep`` (portable across transformers versions)."""
    excess = cache.get_seq_length() - keep
    if excess > 0:
        cache.crop(-excess)


def set_torch_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
