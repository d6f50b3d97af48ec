"""The training loop of ``specd train-draft`` (see ``specd.train_draft`` for what it does)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from specd.draft_errors import TrainDraftError
from specd.draft_eval import continue_greedily, evaluate, path_probs
from specd.pair.train import ce_loss, is_validation, lr_at, make_optimizer, random_batches

TEXT_FIELDS = ("text", "content", "prompt", "turns", "question", "canonical_solution", "label",
               "completion", "response", "answer")
CHECKPOINT, BEST, REPORT, DATA = "checkpoint", "draft", "report.json", "data"
KEYS_THAT_MUST_MATCH = ("target", "draft", "mode", "steps", "seed", "seq_len", "batch_size", "top_k",
                        "self_generate", "prompt_tokens", "eval_tokens", "train_on")


@dataclass
class Prepared:
    stream: np.ndarray  # training token ids, documents separated by EOS
    eval_prompts: list[list[int]]
    eval_paths: list[list[int]]  # the target's greedy continuation of each held-out prompt
    eval_target_p: list[torch.Tensor]  # the target's probabilities along each path (fixed)
    documents: dict[str, int]
    fingerprint: str


def read_documents(paths: list[Path], field: str = "") -> list[tuple[str, str]]:
    """(name, text) per document: JSON(L) records by field, other files whole."""
    documents: list[tuple[str, str]] = []
    for path in paths:
        if not path.is_file():
            raise TrainDraftError(f"--data {str(path)!r}: no such file")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix in (".jsonl", ".json"):
            records = _json_records(path, text)
            texts = [_record_text(record, field) for record in records]
            documents += [(f"{path.name}:{i}", t) for i, t in enumerate(texts) if t]
        elif text.strip():
            documents.append((path.name, text))
    if not documents:
        raise TrainDraftError(f"no documents in {', '.join(map(str, paths))} (field {field or 'auto'!r})")
    return documents


def _json_records(path: Path, text: str) -> list[Any]:
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainDraftError(f"--data {str(path)!r}: not valid JSON ({exc})") from exc
    return data if isinstance(data, list) else [data]


def _record_text(record: Any, field: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return ""
    parts: list[str] = []
    for key in [field] if field else TEXT_FIELDS:
        value = record.get(key)
        values = value if isinstance(value, list) else [value]
        parts += [v for v in values if isinstance(v, str) and v.strip()]
    return "\n".join(parts)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare(args: argparse.Namespace, tokenizer: Any, target: Any) -> Prepared:
    """Split, encode, build held-out prompts with the target's paths; optionally self-generate."""
    documents = read_documents(args.data, args.field)
    digest = hashlib.sha256()
    for name, text in documents:
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    train_docs = [t for n, t in documents if not is_validation(n)]
    val_docs = [t for n, t in documents if is_validation(n)]
    if not val_docs or not train_docs:  # tiny data: hold out the last document
        train_docs, val_docs = [t for _, t in documents[:-1]] or [documents[-1][1]], [documents[-1][1]]
    eos = tokenizer.eos_token_id
    stop = frozenset() if eos is None else frozenset({eos})
    rng = np.random.default_rng(args.seed)
    eval_prompts = _prompts([encode(tokenizer, t) for t in val_docs], args.prompt_tokens)[:args.eval_prompts]
    print(f"scoring: the target continues {len(eval_prompts)} held-out prompts", flush=True)
    eval_paths = continue_greedily(target, eval_prompts, args.eval_tokens, stop)
    eval_target_p = [path_probs(target, p, path) for p, path in zip(eval_prompts, eval_paths, strict=True)]
    encoded = [encode(tokenizer, t) for t in train_docs]
    if args.self_generate:
        shuffled = [encoded[int(i)] for i in rng.permutation(len(encoded))]
        prompts = _prompts(shuffled, args.prompt_tokens)[:args.generate_prompts]
        print(f"self-generate: the target continues {len(prompts)} training prompts", flush=True)
        generated = [p + c for p, c in zip(prompts, continue_greedily(target, prompts, args.self_generate,
                                                                       stop), strict=True)]
        encoded = {"generated": generated, "both": encoded + generated, "data": encoded}[args.train_on]
    ids: list[int] = []
    for doc in encoded:
        ids += doc + ([] if eos is None else [eos])
    stream = np.asarray(ids, dtype=np.int64)
    if stream.size <= args.seq_len + 1:
        raise TrainDraftError(f"only {stream.size} training tokens; need more than --seq-len {args.seq_len}")
    return Prepared(stream, eval_prompts, eval_paths, eval_target_p,
                    {"train": len(train_docs), "held_out": len(val_docs)}, digest.hexdigest())


def _prompts(documents: list[list[int]], length: int) -> list[list[int]]:
    """Prefixes of exactly ``length`` tokens (one batch shape for generation), else shorter ones."""
    full = [ids[:length] for ids in documents if len(ids) >= length]
    return full or [ids[:length] for ids in documents if len(ids) >= 4]


def topk_distill_loss(target: Any, student: Any, window: torch.Tensor, k: int) -> torch.Tensor:
    """Cross-entropy of the student against the target's top-k distribution (renormalised)."""
    inputs = window[:, :-1]
    with torch.no_grad():
        values, ids = target(input_ids=inputs).logits.float().topk(k, dim=-1)
        soft = torch.softmax(values, dim=-1)
    log_q = F.log_softmax(student(input_ids=inputs).logits.float(), dim=-1)
    return -(soft * log_q.gather(-1, ids)).sum(-1).mean()


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from common.models import (
        ModelLoadError,
        TokenizerMismatchError,
        check_tokenizers_compatible,
        load_causal_lm,
    )

    try:
        target = load_causal_lm(args.target)
        start = str(args.out / CHECKPOINT) if args.resume and (args.out / CHECKPOINT).is_dir() else args.draft
        draft = load_causal_lm(start)
        check_tokenizers_compatible(draft, target, args.draft, args.target)
    except (ModelLoadError, TokenizerMismatchError) as exc:
        raise TrainDraftError(str(exc)) from exc
    return target.model, draft.model, draft.tokenizer


# The command line's plumbing, not the training's settings (a resume compares the rest).
_NOT_SETTINGS = ("func", "command", "handler", "needs_settings", "debug")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "data" else v)
            for k, v in vars(args).items() if k not in _NOT_SETTINGS}


def _check_resume(args: argparse.Namespace) -> dict[str, Any] | None:
    """The checkpoint's trainer state when resuming; refuse mismatches and silent overwrites."""
    folder = args.out / CHECKPOINT
    if not folder.is_dir():
        if args.resume:
            print(f"no checkpoint in {args.out}: starting from {args.draft}", flush=True)
        return None
    if not args.resume:
        raise TrainDraftError(f"{folder} exists: pass --resume to continue that run, or choose another --out")
    trainer = load_state(folder / "trainer")
    mine = _settings(args)
    differ = [k for k in KEYS_THAT_MUST_MATCH if trainer["settings"].get(k) != mine.get(k)]
    if differ:
        raise TrainDraftError(f"{folder} was made with other settings ({', '.join(differ)}); "
                              f"use the same ones to resume, or another --out")
    return trainer


def _save_model(model: Any, tokenizer: Any, folder: Path, dtype: str) -> None:
    """Write a loadable model folder atomically (a temp folder renamed over the old one)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16 if dtype == "float16" else torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate, train with checkpoints, evaluate; write OUT/draft (the best) and OUT/report.json."""
    torch.set_num_threads(args.threads)
    resumed = _check_resume(args)
    args.out.mkdir(parents=True, exist_ok=True)
    target, draft, tokenizer = load_models(args)
    target.eval()
    data = _load_or_prepare(args, tokenizer, target, resumed is not None)
    trainer = resumed or _fresh_trainer(args, data, target, draft, tokenizer)
    optimizer = make_optimizer(draft, args.lr, args.weight_decay)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["torch_rng"])
        print(f"resumed at step {resumed['step']} of {args.steps}", flush=True)
    rng = np.random.default_rng()
    rng.bit_generator.state = trainer["numpy_rng"]
    batches = random_batches(data.stream, args.batch_size, args.seq_len, rng)
    def loss_fn(model: Any, window: torch.Tensor) -> torch.Tensor:
        if args.mode == "distill":
            return topk_distill_loss(target, model, window, args.top_k)
        return ce_loss(model, window)

    started = time.monotonic()
    draft.train()
    for step in range(trainer["step"], args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step / args.steps, args.lr, args.warmup)
        loss = loss_fn(draft, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        trainer["step"], trainer["loss"] = step + 1, round(loss.item(), 4)
        if trainer["step"] % args.checkpoint_every == 0 or trainer["step"] == args.steps:
            trainer["numpy_rng"] = rng.bit_generator.state
            _checkpoint(args, trainer, data, target, draft, tokenizer, optimizer)
    trainer["wall_s"] = time.monotonic() - started  # this invocation's training time
    return _finish(args, trainer, data)


def _load_or_prepare(args: argparse.Namespace, tokenizer: Any, target: Any, resuming: bool) -> Prepared:
    """The encoded data of this run: made once (generation included), reloaded on resume."""
    path = args.out / DATA
    if resuming and path.with_suffix(".json").is_file():
        return Prepared(**load_state(path))
    data = prepare(args, tokenizer, target)
    save_state(path, data.__dict__)
    return data


def _fresh_trainer(args: argparse.Namespace, data: Prepared, target: Any, draft: Any,
                   tokenizer: Any) -> dict[str, Any]:
    before = evaluate(draft, data.eval_prompts, data.eval_paths, data.eval_target_p)
    print(f"before: {json.dumps(before)}", flush=True)
    _save_model(draft, tokenizer, args.out / BEST, args.save_dtype)
    return {"settings": _settings(args), "step": 0, "before": before, "evals": [{"step": 0, **before}],
            "best_step": 0, "best": before.get("greedy_acceptance", 0.0),
            "numpy_rng": np.random.default_rng(args.seed).bit_generator.state, "wall_s": 0.0}


def _checkpoint(args: argparse.Namespace, trainer: dict[str, Any], data: Prepared, target: Any, draft: Any,
                tokenizer: Any, optimizer: Any) -> None:
    """Score on held-out prompts, keep the best as OUT/draft, then write OUT/checkpoint atomically."""
    scores = evaluate(draft, data.eval_prompts, data.eval_paths, data.eval_target_p)
    trainer["evals"].append({"step": trainer["step"], "loss": trainer["loss"], **scores})
    print(f"step {trainer['step']}/{args.steps} loss {trainer['loss']} held-out "
          f"acceptance {scores.get('greedy_acceptance')} tokens/round {scores.get('tokens_per_round')}",
          flush=True)
    if scores.get("greedy_acceptance", 0.0) > trainer["best"]:
        trainer["best"], trainer["best_step"] = scores["greedy_acceptance"], trainer["step"]
        _save_model(draft, tokenizer, args.out / BEST, args.save_dtype)
    folder = args.out / CHECKPOINT
    tmp = folder.with_name(CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    draft.save_pretrained(tmp, safe_serialization=True)  # float32: resuming loses nothing
    tokenizer.save_pretrained(tmp)
    save_state(tmp / "trainer", {**trainer, "optimizer": optimizer.state_dict(),
                                 "torch_rng": torch.get_rng_state()})
    old = folder.with_name(CHECKPOINT + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    print(f"checkpoint step {trainer['step']}", flush=True)


def _finish(args: argparse.Namespace, trainer: dict[str, Any], data: Prepared) -> dict[str, Any]:
    best = next(e for e in trainer["evals"] if e["step"] == trainer["best_step"])
    report = {
        "settings": trainer["settings"], "data": {"documents": data.documents, "fingerprint_sha256":
                                                  data.fingerprint, "train_tokens": int(data.stream.size)},
        "before": trainer["before"], "after": {k: v for k, v in best.items() if k not in ("step", "loss")},
        "best_step": trainer["best_step"], "evals": trainer["evals"],
        "wall_s_last_run": round(trainer["wall_s"], 1), "torch_threads": args.threads,
    }
    (args.out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def save_state(base: Path, state: Any) -> None:
    """``base.json`` (structure, plain values) + ``base.safetensors`` (tensors): nothing to unpickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    base.with_suffix(".json").write_text(json.dumps(_flatten(state, tensors)))
    save_file(tensors, str(base.with_suffix(".safetensors")))


def load_state(base: Path) -> Any:
    from safetensors.torch import load_file

    return _unflatten(json.loads(base.with_suffix(".json").read_text()),
                      load_file(str(base.with_suffix(".safetensors"))))


def _flatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.as_tensor(value).contiguous().clone()
        return {"__tensor__": key, "numpy": isinstance(value, np.ndarray)}
    if isinstance(value, dict):  # keys keep their type (optimizer state is keyed by int)
        return {"__items__": [[k, _flatten(v, tensors)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_flatten(v, tensors) for v in value]
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        tensor = tensors[value["__tensor__"]]
        return tensor.numpy() if value["numpy"] else tensor
    if isinstance(value, dict):
        return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value
