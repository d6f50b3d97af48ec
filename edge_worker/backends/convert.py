"""Offline conversion of a Hugging Face draft folder, cached on disk by a content key.

Backends other than torch run a converted model (OpenVINO IR, an ONNX Runtime GenAI folder).
Converting takes seconds to minutes, so the result is kept under ``edge.cache_dir`` in a folder
named by a hash of what determines it: the model's config, its weight files' names, sizes and
modification times, the precision, the device family and the converter's version. A changed
checkpoint or converter gets a new folder; an unchanged one is reused without converting again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common.logs import get_logger
from common.models import (  # noqa: F401 - default_cache_dir: the backends' import
    ModelLoadError,
    default_cache_dir,
    eos_token_ids,
    load_tokenizer,
    resolve_model_path,
    vocab_fingerprint,
)

log = get_logger("specd.edge.convert")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DONE_MARKER = "specd-converted.json"


def model_folder(name: str, cache_dir: str | Path = "") -> Path:
    """A local folder for ``name``: bundled, named, a path, a GGUF file's dequantised copy in
    ``cache_dir``, or a hub id (from the local hub cache)."""
    path = Path(resolve_model_path(name, cache_dir))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as exc:
        raise ModelLoadError(f"cannot find the draft model {name!r} to convert: {exc}") from exc


def cache_key(folder: Path, *parts: str) -> str:
    """A hash of the model's config, its weight files' stats and ``parts`` (precision, versions)."""
    digest = hashlib.sha256()
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for item in sorted(folder.iterdir()):
        if item.suffix in WEIGHT_SUFFIXES or item.name.endswith(".safetensors.index.json"):
            stat = item.stat()
            digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for part in parts:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:24]


def cached_conversion(root: Path, key: str, convert: Callable[[Path], None],
                      describe: dict[str, Any]) -> tuple[Path, bool]:
    """The converted folder for ``key`` under ``root``, converting first on a miss.

    Returns (folder, converted now?). Conversion writes to a temporary sibling folder that is
    renamed into place, so a crash never leaves a half-written folder that looks complete.
    """
    target = root / key
    if (target / DONE_MARKER).is_file():
        return target, False
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        convert(work)
        (work / DONE_MARKER).write_text(json.dumps(describe, indent=1))
        if target.exists():  # another process finished first, or a stale partial folder
            shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("edge.model_converted", folder=str(target), **describe)
    return target, True


@dataclass
class DraftMeta:
    """What every backend reports about its draft, read from the Hugging Face folder."""

    tokenizer: Any
    fingerprint: str
    eos_token_ids: frozenset[int]
    vocab_size: int
    config: Any


def read_meta(name: str, folder: Path, trust_remote_code: bool = False) -> DraftMeta:
    """Tokenizer, fingerprint, stop ids and vocabulary size without loading the weights."""
    from transformers import AutoConfig, GenerationConfig

    tokenizer = load_tokenizer(str(folder) if not name.startswith("bundled:") else name,
                               trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        generation: Any = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the model config's ids are used
        generation = None
    holder = SimpleNamespace(generation_config=generation, config=config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return DraftMeta(tokenizer, vocab_fingerprint(tokenizer), eos_token_ids(holder, tokenizer),
                     int(text_config.vocab_size), config)


def check_precision(backend: str, precision: str, supported: Iterable[str]) -> None:
    supported = list(supported)
    if precision not in supported:
        raise ValueError(f"the {backend} backend supports precision {', '.join(supported)}, "
                         f"not {precision!r}")


def adopt_identity(backend: Any, model: str, folder: Path, trust_remote_code: bool) -> DraftMeta:
    """Set a converted backend's model name, tokenizer, fingerprint, stop ids and vocabulary."""
    meta = read_meta(model, folder, trust_remote_code)
    backend.model_name, backend.tokenizer = model, meta.tokenizer
    backend.fingerprint, backend.eos_token_ids, backend.vocab_size = (
        meta.fingerprint, meta.eos_token_ids, meta.vocab_size)
    return meta
