"""``specd train-draft --feature``: a feature draft (common.feature_draft) distilled for a target.

Data: the chat prompts of ``--from-target`` (Spec-Bench first turns, held out by
``question_id % 4 == 0``; WMT de->en; HumanEval), answered greedily by the target (a bf16 copy,
left-padded batches), keeping for every generated token the feature that produced it: the input
of the target's output layer, caught by a hook, so no second target pass is needed. Cached in
``OUT/features.json`` + ``OUT/features.safetensors``; a rerun answers only what is missing.

Training, for an anchor position i of an answer (the feature F[i] produced the token T[i]):

    s_0 = F[i];  s_k = step(s_{k-1}, T[i + k - 1])  for k = 1..K  (``--unroll``, teacher-forced
    tokens: the tokens a round drafts after as long as it is accepted)
    loss_k = CE(head(s_k), softmax(W_sub F[i + k]))    the target's own distribution over the subset
           + 0.5 CE(head(s_k), T[i + k])               its greedy token (when in the subset)
           + SmoothL1(s_k, F[i + k])                   the feature itself (as EAGLE)
    loss = sum_k 0.8^(k-1) loss_k over anchors with i + k inside the answer

Scoring (held-out answers, teacher-forced chains from every anchor): the share of steps whose
greedy token is the target's, per step, and at gamma 4 the accepted share of drafted tokens and
the mean accepted length (a round's accepted run stops at its first miss).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.feature_draft import FeatureDraft, FeatureDraftConfig, save_feature_draft
from specd.draft_errors import TrainDraftError
from specd.draft_teacher import ChatPrompt, build_prompts

FEATURES = "features"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")
STEP_DECAY = 0.8


@dataclass
class FeatureData:
    prompts: list[ChatPrompt]
    paths: list[list[int]]  # the target's greedy answer per prompt (stop token kept)
    features: list[torch.Tensor]  # [len(path), H] float16: the feature that produced each token


@dataclass
class Flat:
    """Answers side by side: tokens [N], features [N, H], positions left in each answer [N]."""

    tokens: torch.Tensor
    features: torch.Tensor
    left: torch.Tensor


# ---------------------------------------------------------------- data


@torch.inference_mode()
def answer_with_features(model: Any, prompts: list[list[int]], new_tokens: int, pad: int,
                         stop: frozenset[int]) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy answers of left-padded ``prompts`` and the feature behind every generated token."""
    caught: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: caught.append(args[0][:, -1, :].to(torch.float16)))
    try:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True, pad_token_id=pad,
                             eos_token_id=sorted(stop) or None)
    finally:
        hook.remove()
    features = torch.stack(caught, dim=1)  # [B, T, H]
    results = []
    for row in range(len(prompts)):
        path = out.sequences[row, width:].tolist()
        cut = next((i + 1 for i, t in enumerate(path) if t in stop), len(path))
        results.append((path[:cut], features[row, :cut].clone()))
    return results


def feature_data(args: argparse.Namespace, loaded: Any, data_dir: Path) -> FeatureData:
    """The target's answers and features, from ``OUT/features.*`` or generated (then cached)."""
    from safetensors.torch import load_file, save_file

    base = args.out / FEATURES
    prompts = build_prompts(data_dir, loaded.tokenizer, args.prompt_limit, args.wmt_prompts,
                            args.humaneval_prompts)
    if base.with_suffix(".json").is_file():
        cached = json.loads(base.with_suffix(".json").read_text())
        tensors = load_file(str(base.with_suffix(".safetensors")))
        known = {(p["source"], p["ident"]): i for i, p in enumerate(cached["prompts"])}
        if all((p.source, p.ident) in known for p in prompts):
            order = [known[(p.source, p.ident)] for p in prompts]
            print(f"features: {len(prompts)} answers from {base}.json", flush=True)
            return FeatureData(prompts, [cached["paths"][i] for i in order],
                               [tensors[f"f{i}"] for i in order])
    model = loaded.model
    if args.teacher_dtype == "bfloat16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    stop = loaded.eos_token_ids
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else min(stop)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
    answers: dict[int, tuple[list[int], torch.Tensor]] = {}
    started = time.monotonic()
    for start in range(0, len(order), args.generate_batch):
        group = order[start:start + args.generate_batch]
        batch = answer_with_features(model, [prompts[i].ids for i in group], args.self_generate or 128,
                                     pad, stop)
        answers.update(zip(group, batch, strict=True))
        print(f"features: {len(answers)}/{len(prompts)} answered, {time.monotonic() - started:.0f} s",
              flush=True)
    data = FeatureData(prompts, [answers[i][0] for i in range(len(prompts))],
                       [answers[i][1] for i in range(len(prompts))])
    record = {"prompts": [p.__dict__ for p in prompts], "paths": data.paths}
    base.with_suffix(".json").write_text(json.dumps(record))
    save_file({f"f{i}": f.contiguous() for i, f in enumerate(data.features)},
              str(base.with_suffix(".safetensors")))
    return data


def flatten(data: FeatureData, indices: list[int]) -> Flat:
    keep = [i for i in indices if len(data.paths[i]) >= 2]
    if not keep:
        raise TrainDraftError("no answer of two tokens or more to train or score on")
    return Flat(torch.cat([torch.tensor(data.paths[i]) for i in keep]),
                torch.cat([data.features[i] for i in keep]),
                torch.cat([torch.arange(len(data.paths[i]) - 1, -1, -1) for i in keep]))


def vocabulary_subset(data: FeatureData, train: list[int], size: int, vocab: int,
                      must: frozenset[int]) -> list[int]:
    """The ``size`` ids the target emits most in the training answers (stop ids first), then the
    most frequent prompt ids, then the lowest ids: the ids the draft's head scores."""
    answers = Counter(t for i in train for t in data.paths[i])
    prompts = Counter(t for i in train for t in data.prompts[i].ids)
    chosen = list(dict.fromkeys([*sorted(must), *(t for t, _ in answers.most_common()),
                                 *(t for t, _ in prompts.most_common())]))[:size]
    taken = set(chosen)
    chosen += [t for t in range(vocab) if t not in taken][:size - len(chosen)]
    return sorted(chosen)


# ---------------------------------------------------------------- training and scoring


def unroll(draft: FeatureDraft, flat: Flat, anchors: torch.Tensor,
           steps: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step k: (predicted feature [B, H], true feature [B, H], true token [B], valid [B])."""
    state = flat.features[anchors].float()
    out = []
    for k in range(1, steps + 1):
        valid = flat.left[anchors] >= k
        here = torch.where(valid, anchors + k, anchors)
        state = draft.step(state, flat.tokens[torch.where(valid, anchors + k - 1, anchors)])
        out.append((state, flat.features[here].float(), flat.tokens[here], valid))
    return out


def batch_loss(draft: FeatureDraft, flat: Flat, anchors: torch.Tensor, steps: int, head_rows: torch.Tensor,
               remap: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(())
    for k, (predicted, true, token, valid) in enumerate(unroll(draft, flat, anchors, steps)):
        logp = torch.log_softmax(draft.head.subset_logits(predicted).float(), dim=-1)
        with torch.no_grad():
            soft = torch.softmax(true @ head_rows.T, dim=-1)  # the target's own, over the subset
        label = remap[token]
        hard = -logp.gather(1, label.clamp(min=0)[:, None])[:, 0] * (label >= 0)
        feature = torch.nn.functional.smooth_l1_loss(predicted.float(), true, reduction="none").mean(-1)
        loss = (-(soft * logp).sum(-1) + 0.5 * hard + feature) * valid
        total = total + STEP_DECAY ** k * loss.sum() / valid.sum().clamp(min=1)
    return total


@torch.no_grad()
def score(draft: FeatureDraft, flat: Flat, steps: int = 5, gamma: int = 4) -> dict[str, Any]:
    anchors = torch.nonzero(flat.left >= 1).squeeze(1)
    subset = draft.head.token_ids
    alive = torch.ones(len(anchors), dtype=torch.bool)
    per_step, accepted, drafted = [], torch.zeros(len(anchors)), torch.zeros(len(anchors))
    for k, (predicted, _, token, valid) in enumerate(unroll(draft, flat, anchors, steps)):
        hit = (subset[draft.head.subset_logits(predicted).argmax(-1)] == token) & valid
        per_step.append(round(float(hit.sum() / valid.sum().clamp(min=1)), 4))
        alive &= hit
        if k < gamma:
            accepted += alive.float()
            drafted += valid.float()
    return {"step_accuracy": per_step, "acceptance_gamma4": round(float(accepted.sum() / drafted.sum()), 4),
            "mean_accepted_gamma4": round(float(accepted.mean()), 3), "anchors": len(anchors)}


def _lr(step: int, steps: int, peak: float, warmup: float) -> float:
    warm = max(1, int(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def train_feature_draft(args: argparse.Namespace) -> dict[str, Any]:
    from specd.draft_distil import _data_dir, load_target

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_target(args)
    target = loaded.model
    data = feature_data(args, loaded, _data_dir(args.data))
    train = [i for i, p in enumerate(data.prompts) if not p.held_out]
    held_out = [i for i, p in enumerate(data.prompts) if p.held_out]
    train_flat, held_flat = flatten(data, train), flatten(data, held_out)
    embedding = target.get_input_embeddings().weight.detach().float()
    head_rows_all = target.get_output_embeddings().weight.detach().float()
    vocab, hidden = head_rows_all.shape
    subset = torch.tensor(vocabulary_subset(data, train, args.vocab_subset, vocab, loaded.eos_token_ids))
    remap = torch.full((vocab,), -1, dtype=torch.long)
    remap[subset] = torch.arange(len(subset))
    config = FeatureDraftConfig(hidden_size=hidden, intermediate_size=args.feature_inner,
                                layers=args.feature_layers, vocab_size=vocab,
                                rms_norm_eps=float(getattr(target.config, "rms_norm_eps", 1e-5)))
    draft = FeatureDraft(config, embedding, target.model.norm.weight.detach().float(), subset)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    anchors = torch.nonzero(train_flat.left >= 1).squeeze(1)
    generator = torch.Generator().manual_seed(args.seed)
    evals = [{"step": 0, **score(draft, held_flat)}]
    print(f"before: {evals[-1]}", flush=True)
    started = time.monotonic()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, args.steps, args.lr, args.warmup)
        batch = anchors[torch.randint(len(anchors), (args.batch_size,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = batch_loss(draft, train_flat, batch, args.unroll, head_rows_all[subset], remap)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        if done % 50 == 0:
            print(f"step {done}/{args.steps} loss {loss.item():.4f} {time.monotonic() - started:.0f} s",
                  flush=True)
        if done % args.checkpoint_every == 0 or done == args.steps:
            evals.append({"step": done, "loss": round(loss.item(), 4), **score(draft, held_flat)})
            print(f"step {done}: {evals[-1]}", flush=True)
    report = {
        "settings": {k: [str(p) for p in v] if k == "data" else str(v) if isinstance(v, Path) else v
                     for k, v in vars(args).items()
                     if k not in ("handler", "needs_settings", "func", "command")},
        "config": config.__dict__, "vocab_subset": len(subset),
        "data": {"train_answers": len(train), "train_tokens": int(train_flat.tokens.numel()),
                 "held_out_answers": len(held_out), "held_out_tokens": int(held_flat.tokens.numel()),
                 "held_out_rule": "Spec-Bench question_id % 4 == 0 (scored only, never trained on)"},
        "before": evals[0], "after": evals[-1], "evals": evals,
        "train_wall_s": round(time.monotonic() - started, 1), "threads": args.threads,
    }
    _save(args, draft, loaded, report)
    return report


def _save(args: argparse.Namespace, draft: FeatureDraft, loaded: Any, report: dict[str, Any]) -> None:
    """OUT/draft: the shippable folder (its tensors, the record of where the embedding comes from,
    the tokenizer files) and OUT/report.json (also OUT/draft/training.json)."""
    from common.reduced_draft import file_sha256

    out = args.out / "draft"
    meta: dict[str, Any] = {"eos_token_ids": sorted(loaded.eos_token_ids)}
    if args.target_gguf:  # the shipped form: the embedding is read from the target's GGUF
        meta.update(embedding_tensor="token_embd.weight", target_package=args.target_package,
                    target_file=Path(args.target_gguf).name,
                    target_sha256=file_sha256(Path(args.target_gguf)))
    else:
        meta["embedding_model"] = str(args.target)
    save_feature_draft(draft, out, meta)
    loaded.tokenizer.save_pretrained(str(out))
    for extra in list(out.iterdir()):
        if extra.name not in (*TOKENIZER_FILES, "specd_feature_draft.json", "feature_draft.safetensors"):
            extra.unlink()
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.copy2(args.out / "report.json", out / "training.json")
