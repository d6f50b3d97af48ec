"""Train the bundled tiny draft/target pair on the Python standard library.

The recipe is deliberately small so that it reruns on a 2-core CPU in well under an hour:

1. Corpus: the running interpreter's standard-library ``*.py`` files (without tests, idlelib and
   site-packages), split into train/validation by a hash of each file's relative path.
2. A byte-level BPE tokenizer trained on the training files, saved as a
   ``PreTrainedTokenizerFast`` into both model folders.
3. A Llama-architecture target, trained for a fixed number of optimizer steps (step budgets,
   not wall-clock ones, so a rerun on a busier or faster machine sees the same batches).
4. A much smaller Llama draft: plain next-token training, then distillation from the (shipped,
   fp16-rounded) target's logits with a KL loss at temperature 1.

Both models are saved in float16 with safetensors, and ``training.json`` records the settings,
the corpus fingerprint, token counts, wall times and final metrics.

Run: ``python -m specd.pair.train --out common/assets/tiny_pair``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specd.pair.options import TRAIN_DESCRIPTION, add_train_arguments

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
VALIDATION_PER_MILLE = 30  # ~3% of files are held out
TARGET_DIR, DRAFT_DIR = "target", "draft"


@dataclass(frozen=True)
class Corpus:
    """Standard-library sources split into train and validation documents."""

    root: str
    train_paths: list[str]
    val_paths: list[str]
    train_texts: list[str]
    val_texts: list[str]
    fingerprint: str


@dataclass(frozen=True)
class Shape:
    """The Llama hyper-parameters that differ between target and draft."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


# 8 layers: per-layer call overhead dominates a cached decode step on CPU, so a deeper target
# and a 2-layer draft keep one draft step under a fifth of a target step (measured: ~0.17).
TARGET_SHAPE = Shape(384, 8, 6, 2, 1024)
DRAFT_SHAPE = Shape(128, 2, 4, 2, 384)


def is_validation(rel_path: str) -> bool:
    """Deterministic held-out split: hash of the relative path, ~3% of files."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VALIDATION_PER_MILLE


def stdlib_files(root: Path) -> list[str]:
    """Sorted relative paths of the standard library's ``*.py`` files, minus excluded dirs."""
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            paths.append(rel.as_posix())
    return sorted(paths)


def load_corpus(root: str | None = None) -> Corpus:
    """Read the standard library, split it and fingerprint it (sha256 of paths + contents)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256()
    train_paths, val_paths, train_texts, val_texts = [], [], [], []
    for rel in stdlib_files(base):
        data = (base / rel).read_bytes()
        digest.update(rel.encode("utf-8") + b"\0" + data + b"\0")
        text = data.decode("utf-8", errors="replace")
        if is_validation(rel):
            val_paths.append(rel)
            val_texts.append(text)
        else:
            train_paths.append(rel)
            train_texts.append(text)
    return Corpus(str(base), train_paths, val_paths, train_texts, val_texts, digest.hexdigest())


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of all documents, each followed by ``<|eos|>``, as one uint16 stream."""
    eos = tokenizer.eos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch(texts)
    ids: list[int] = []
    for enc in encodings:
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def cached_stream(tokenizer, texts: list[str], cache: Path) -> np.ndarray:
    """Encode ``texts`` once and keep the stream in ``cache`` (keyed by corpus and vocab)."""
    if cache.exists():
        return np.fromfile(cache, dtype=np.uint16)  # raw token ids: nothing to deserialise
    stream = encode_documents(tokenizer, texts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    stream.tofile(cache)
    return stream


def build_model(shape: Shape, tokenizer, max_positions: int):
    """A freshly initialised Llama causal LM with tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **asdict(shape),
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def param_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW (0.9, 0.95) with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def lr_at(fraction: float, peak: float, warmup: float, floor: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``floor * peak``, by elapsed fraction of the budget."""
    if fraction < warmup:
        return peak * max(fraction / warmup, 0.01)
    progress = min((fraction - warmup) / max(1.0 - warmup, 1e-9), 1.0)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def random_batches(
    stream: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches of random ``seq_len + 1`` token windows from ``stream``."""
    while True:
        starts = rng.integers(0, len(stream) - seq_len - 1, size=batch)
        windows = np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(windows)


def ce_loss(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats/token) of ``window[:, 1:]`` given ``window[:, :-1]``."""
    logits = model(input_ids=window[:, :-1]).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))


def distill_loss(
    teacher: torch.nn.Module, student: torch.nn.Module, window: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) per token at temperature 1."""
    inputs = window[:, :-1]
    with torch.no_grad():
        log_p = F.log_softmax(teacher(input_ids=inputs).logits.float(), dim=-1)
    log_q = F.log_softmax(student(input_ids=inputs).logits.float(), dim=-1)
    vocab = log_q.size(-1)
    return F.kl_div(
        log_q.reshape(-1, vocab), log_p.reshape(-1, vocab), log_target=True, reduction="batchmean"
    )


LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def train_for(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup: float,
    weight_decay: float,
    label: str,
) -> dict:
    """Train ``model`` for ``steps`` optimizer steps with a step-based schedule; return run stats.

    Plain float32: on the CPUs measured here bf16 autocast was slower (2.4 vs 2.0 s/step).
    """
    optimizer = make_optimizer(model, lr, weight_decay)
    model.train()
    start = time.monotonic()
    tokens, ema = 0, 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step / steps, lr, warmup)
        window = next(batches)
        loss = loss_fn(model, window)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += window[:, 1:].numel()
        ema = loss.item() if step == 0 else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 25 == 0:
            minutes = (time.monotonic() - start) / 60
            print(f"[{label}] step {step + 1}/{steps} {minutes:.1f} min loss~{ema:.3f}", flush=True)
    model.eval()
    wall = time.monotonic() - start
    print(f"[{label}] done: {steps} steps, {tokens} tokens, {wall / 60:.1f} min", flush=True)
    return {"steps": steps, "tokens": tokens, "wall_s": round(wall, 1), "final_train_loss": ema}


@torch.no_grad()
def eval_loss(model: torch.nn.Module, stream: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """Mean next-token loss (nats/token) over consecutive windows of ``stream``."""
    model.eval()
    total, count = 0.0, 0
    limit = min(len(stream) - 1, max_tokens)
    for start in range(0, limit - seq_len + 1, seq_len):
        window = torch.from_numpy(stream[start : start + seq_len + 1].astype(np.int64))[None]
        total += ce_loss(model, window).item() * seq_len
        count += seq_len
    return total / count


def save_fp16(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save ``model`` as float16 safetensors plus the tokenizer into ``folder``."""
    if folder.exists():
        shutil.rmtree(folder)
    model.half().save_pretrained(folder, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(folder)


def load_fp32(folder: Path) -> torch.nn.Module:
    """Reload a saved model in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def load_previous(out: Path, fingerprint: str) -> dict:
    """The ``training.json`` of the run whose target is reused; it must match the corpus."""
    previous = json.loads((out / "training.json").read_text())
    if previous["corpus"]["fingerprint_sha256"] != fingerprint:
        raise ValueError("corpus differs from the one the saved target was trained on")
    return previous


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of the recipe."""
    parser = argparse.ArgumentParser(prog="python -m specd.pair.train", description=TRAIN_DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(parser)
    return parser.parse_args(argv)


def recipe_command(args: argparse.Namespace) -> str:
    """The command line that reruns this recipe, every option spelled out."""
    parts = ["python -m specd.pair.train"]
    for key, value in vars(args).items():
        if key in ("command", "debug", "handler", "needs_settings") or value is False:
            continue
        parts.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the whole recipe; write both model folders and ``training.json``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    t0 = time.monotonic()

    corpus = load_corpus()
    previous = load_previous(out, corpus.fingerprint) if args.reuse_target else None
    if previous is None:
        tokenizer = train_tokenizer(corpus.train_texts, args.vocab_size)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / TARGET_DIR)
    wall["tokenizer_s"] = round(time.monotonic() - t0, 1)
    key = f"{corpus.fingerprint[:16]}-v{len(tokenizer)}"
    cache = Path(args.cache_dir)
    train_stream = cached_stream(tokenizer, corpus.train_texts, cache / f"{key}-train.u16")
    val_stream = cached_stream(tokenizer, corpus.val_texts, cache / f"{key}-val.u16")
    print(
        f"corpus: {len(corpus.train_paths)}+{len(corpus.val_paths)} files, "
        f"{len(train_stream)}+{len(val_stream)} tokens, vocab {len(tokenizer)}",
        flush=True,
    )

    def batches() -> Iterator[torch.Tensor]:
        return random_batches(train_stream, args.batch_size, args.seq_len, rng)

    common = {"warmup": args.warmup, "weight_decay": args.weight_decay}
    if previous is None:
        target = build_model(TARGET_SHAPE, tokenizer, args.max_positions)
        runs = {
            "target": train_for(
                target,
                ce_loss,
                batches(),
                steps=args.target_steps,
                lr=args.target_lr,
                label="target",
                **common,
            )
        }
        target_val_fp32 = eval_loss(target, val_stream, args.seq_len, args.eval_tokens)
        save_fp16(target, tokenizer, out / TARGET_DIR)
    else:
        runs = {"target": previous["runs"]["target"]}
        target_val_fp32 = previous["metrics"]["target_val_loss_fp32"]
    target = load_fp32(out / TARGET_DIR)  # distil from exactly what ships

    draft = build_model(DRAFT_SHAPE, tokenizer, args.max_positions)
    runs["draft_plain"] = train_for(
        draft,
        ce_loss,
        batches(),
        steps=args.draft_steps,
        lr=args.draft_lr,
        label="draft",
        **common,
    )
    draft_val_plain = eval_loss(draft, val_stream, args.seq_len, args.eval_tokens)
    runs["draft_distill"] = train_for(
        draft,
        lambda m, w: distill_loss(target, m, w),
        batches(),
        steps=args.distill_steps,
        lr=args.distill_lr,
        label="distill",
        **common,
    )
    draft_val_fp32 = eval_loss(draft, val_stream, args.seq_len, args.eval_tokens)
    save_fp16(draft, tokenizer, out / DRAFT_DIR)
    draft = load_fp32(out / DRAFT_DIR)
    wall["total_s"] = round(time.monotonic() - t0, 1)

    if previous is None:
        target_val_fp16 = eval_loss(target, val_stream, args.seq_len, args.eval_tokens)
    else:
        target_val_fp16 = previous["metrics"]["target_val_loss_fp16_reloaded"]
    metrics = {
        "target_val_loss_fp32": round(target_val_fp32, 4),
        "target_val_loss_fp16_reloaded": round(target_val_fp16, 4),
        "draft_val_loss_after_plain": round(draft_val_plain, 4),
        "draft_val_loss_fp32": round(draft_val_fp32, 4),
        "draft_val_loss_fp16_reloaded": round(
            eval_loss(draft, val_stream, args.seq_len, args.eval_tokens), 4
        ),
    }
    report = {
        "recipe": recipe_command(args),
        "target_from_previous_run": None
        if previous is None
        else {key: previous[key] for key in ("recipe", "settings", "wall_times")},
        "settings": vars(args),
        "shapes": {"target": asdict(TARGET_SHAPE), "draft": asdict(DRAFT_SHAPE)},
        "params": {"target": param_count(target), "draft": param_count(draft)},
        "corpus": {
            "stdlib_root": corpus.root,
            "python": platform.python_version(),
            "fingerprint_sha256": corpus.fingerprint,
            "train_files": len(corpus.train_paths),
            "val_files": len(corpus.val_paths),
            "val_paths": corpus.val_paths,
            "train_tokens": len(train_stream),
            "val_tokens": len(val_stream),
        },
        "vocab_size": len(tokenizer),
        "runs": runs,
        "wall_times": wall,
        "metrics": metrics,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {args.threads} torch threads, no GPU",
    }
    sizes = {name: folder_bytes(out / name) for name in (TARGET_DIR, DRAFT_DIR)}
    report["shipped_bytes"] = sizes
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"metrics": metrics, "bytes": sizes}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
