"""``specd train-draft --from-target``: a new small draft cut from a target and distilled on its answers.

1. **Teacher data** (``specd.draft_teacher``): the target answers chat-templated prompts greedily
   in batches; every generated position keeps the target's token and its top-k logits. Kept in
   ``OUT/teacher.*`` (made once; a rerun or ``--resume`` reuses it).
2. **Vocabulary subset** (FR-Spec): the K ids the target emits most often in the training answers
   (then its top-k candidates, then the lowest ids: BPE ranks frequent tokens first).
3. **The draft**: the target's config with ``--layers`` of its layers (copied), its embedding
   table (frozen), its final norm, and a reduced head initialised from the target's tied output
   rows at the K ids (``common.reduced_draft``).
4. **Distillation** on the training answers (the prompt's last ``--context`` tokens as context,
   loss only on the target's tokens): ``--hard-weight`` x cross-entropy on the target's greedy
   token + (1 - that) x cross-entropy against its top-k distribution renormalised over the
   subset. bf16 autocast on the CPU.
5. **Scoring** on the held-out Spec-Bench questions (``question_id % 4 == 0``), per category:
   per-position greedy agreement with the target's answer and the rounds of a greedy session at
   gamma 2/4/8 (acceptance = accepted / drafted). Before training, at every checkpoint, at the
   end; ``OUT/draft`` holds the best (a complete Hugging Face folder), ``OUT/shipped`` the same
   draft without the target's embedding (what the repository ships), ``OUT/report.json`` the record.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.reduced_draft import ReducedHead, export_shipped, file_sha256, save_full_folder
from specd.draft_errors import TrainDraftError
from specd.draft_eval import rounds_for
from specd.draft_teacher import (
    TeacherData,
    build_prompts,
    generate_teacher,
    teacher_from_state,
    teacher_state,
)
from specd.draft_training import load_state, save_state

TEACHER, BEST, SHIPPED, CHECKPOINT, REPORT = "teacher", "draft", "shipped", "checkpoint", "report.json"
LABELS = "held_out_labels.json"


def parse_layers(text: str, total: int) -> list[int]:
    try:
        layers = [int(x) % total if int(x) < 0 else int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise TrainDraftError(f"--layers {text!r}: give comma-separated layer numbers, e.g. 0,1,-1") from exc
    if not layers or any(not 0 <= x < total for x in layers):
        raise TrainDraftError(f"--layers {text!r}: the target has layers 0..{total - 1}")
    return layers


def draft_from_target(target: Any, layers: list[int], token_ids: list[int]) -> Any:
    """A Llama-style draft: ``layers`` of ``target`` (copied), its embedding (frozen), a reduced head."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    config.tie_word_embeddings = False
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    draft = type(target)(config)
    draft.model.embed_tokens.weight.data.copy_(target.get_input_embeddings().weight.data)
    draft.model.embed_tokens.weight.requires_grad_(False)
    for index, layer in enumerate(layers):
        draft.model.layers[index].load_state_dict(target.model.layers[layer].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    ids = torch.tensor(token_ids, dtype=torch.long)
    head_rows = target.get_output_embeddings().weight.data[ids].clone()
    draft.set_output_embeddings(ReducedHead(head_rows, ids, int(config.vocab_size)))
    return draft.float()


def vocabulary_subset(data: TeacherData, train: list[int], size: int, vocab: int,
                      always: frozenset[int]) -> list[int]:
    """The ``size`` ids the target emits most (greedy tokens, then top-k candidates, then low ids)."""
    greedy: Counter[int] = Counter()
    candidates: Counter[int] = Counter()
    for i in train:
        greedy.update(data.paths[i])
        candidates.update(data.top_ids[i][:, :8].reshape(-1).tolist())
    chosen = list(dict.fromkeys([*sorted(always), *(t for t, _ in greedy.most_common()),
                                 *(t for t, _ in candidates.most_common())]))[:size]
    taken = set(chosen)
    chosen += [t for t in range(vocab) if t not in taken][:size - len(chosen)]
    return sorted(chosen)


def make_examples(data: TeacherData, indices: list[int], context: int) -> list[tuple[list[int], int]]:
    """(tokens, number of leading context tokens) per example: the prompt's tail + the answer."""
    out = []
    for i in indices:
        prompt, path = data.prompts[i].ids, data.paths[i]
        if path:
            tail = prompt[-context:]
            out.append((tail + path, len(tail)))
    return out


def batch_loss(draft: Any, data: TeacherData, indices: list[int], context: int, remap: torch.Tensor,
               hard_weight: float) -> torch.Tensor:
    """Distillation loss over a batch of training answers (right-padded, loss on answers only)."""
    rows = make_examples(data, indices, context)
    width = max(len(t) for t, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (tokens, _) in enumerate(rows):
        ids[r, :len(tokens)] = torch.tensor(tokens)
        mask[r, :len(tokens)] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = draft.model(input_ids=ids, attention_mask=mask).last_hidden_state
    losses = []
    for r, (tokens, start) in enumerate(rows):
        n = len(tokens) - start
        h = hidden[r, start - 1:start - 1 + n].float()  # position j predicts token j + 1
        log_q = F.log_softmax(draft.get_output_embeddings().subset_logits(h), dim=-1)  # [n, K]
        index = indices[r]
        target_ids = remap[torch.tensor(data.paths[index])]
        known = target_ids >= 0
        hard = -log_q[known].gather(-1, target_ids[known][:, None]).mean() if known.any() else log_q.sum() * 0
        top_ids, top_logits = remap[data.top_ids[index].long()], data.top_logits[index].float()
        top_logits = top_logits.masked_fill(top_ids < 0, float("-inf"))
        soft_p = torch.softmax(top_logits, dim=-1)
        soft = -(soft_p * log_q.gather(-1, top_ids.clamp(min=0))).nan_to_num().sum(-1).mean()
        losses.append(hard_weight * hard + (1 - hard_weight) * soft)
    return torch.stack(losses).mean()


@torch.inference_mode()
def path_argmax(model: Any, prompt: list[int], path: list[int]) -> torch.Tensor:
    """[len(path)] the model's greedy choice at every position of ``path`` (teacher-forced)."""
    logits = model(input_ids=torch.tensor([prompt + path]), logits_to_keep=len(path) + 1).logits
    return logits[0, :-1].argmax(-1)


def scoring_labels(target: Any, data: TeacherData, indices: list[int], out: Path) -> dict[int, list[int]]:
    """The target's own (full-precision) greedy choice along each held-out answer, cached in ``out``.

    The answers may come from a bf16 teacher; what a speculative session accepts is what the
    target, in its serving precision, would choose at each position.
    """
    if out.is_file():
        return {int(k): v for k, v in json.loads(out.read_text()).items()}
    labels = {i: path_argmax(target, data.prompts[i].ids, data.paths[i]).tolist() for i in indices
              if data.paths[i]}
    out.write_text(json.dumps(labels))
    return labels


@torch.inference_mode()
def agreement(draft: Any, data: TeacherData, indices: list[int],
              labels: dict[int, list[int]] | None = None) -> list[list[bool]]:
    """Per held-out answer: does the draft's argmax equal the target's choice at each position."""
    was_training = draft.training
    draft.eval()
    out = []
    for i in indices:
        prompt, path = data.prompts[i].ids, data.paths[i]
        if not path:
            continue
        wanted = torch.tensor(labels[i] if labels is not None else path)
        out.append((path_argmax(draft, prompt, path) == wanted).tolist())
    if was_training:
        draft.train()
    return out


def summarise_matches(matches: list[list[bool]], gammas: tuple[int, ...] = (2, 4, 8)) -> dict[str, Any]:
    positions = sum(len(m) for m in matches)
    if not positions:
        return {"answers": len(matches), "positions": 0}
    figures: dict[str, Any] = {"answers": len(matches), "positions": positions,
                               "agreement": round(sum(sum(m) for m in matches) / positions, 4)}
    for gamma in gammas:
        rounds = sum(rounds_for(m, gamma) for m in matches)
        drafted, accepted = map(sum, zip(*(_drafted(m, gamma) for m in matches), strict=True))
        figures[f"gamma_{gamma}"] = {"tokens_per_round": round(positions / rounds, 3),
                                     "acceptance": round(accepted / drafted, 4) if drafted else 0.0}
    return figures


def _drafted(matches: list[bool], gamma: int) -> tuple[int, int]:
    """(drafted, accepted) tokens of a greedy session with fixed ``gamma`` (never past the answer's end)."""
    drafted, accepted, position = 0, 0, 0
    while position < len(matches):
        drafted += min(gamma, len(matches) - position)
        run = 0
        while run < gamma and position + run < len(matches) and matches[position + run]:
            run += 1
        accepted += run
        position += run + 1
    return drafted, accepted


def evaluate(draft: Any, data: TeacherData, held_out: list[int],
             labels: dict[int, list[int]] | None = None) -> dict[str, Any]:
    by_category: dict[str, list[int]] = {}
    for i in held_out:
        by_category.setdefault(data.prompts[i].category, []).append(i)
    matches = {c: agreement(draft, data, idx, labels) for c, idx in sorted(by_category.items())}
    return {"overall": summarise_matches([m for ms in matches.values() for m in ms]),
            "categories": {c: summarise_matches(m) for c, m in matches.items()}}


def _headline(scores: dict[str, Any]) -> str:
    overall = scores["overall"]
    g4 = overall.get("gamma_4", {})
    return (f"agreement {overall.get('agreement')} acceptance@4 {g4.get('acceptance')} "
            f"tokens/round@4 {g4.get('tokens_per_round')}")


def load_target(args: argparse.Namespace) -> Any:
    from common.models import ModelLoadError, load_causal_lm

    try:
        return load_causal_lm(args.target)
    except ModelLoadError as exc:
        raise TrainDraftError(str(exc)) from exc


def teacher_data(args: argparse.Namespace, loaded: Any) -> TeacherData:
    """The target's answers, kept in ``OUT/teacher.*``: only prompts not answered there are generated."""
    base = args.out / TEACHER
    prompts = build_prompts(_data_dir(args.data), loaded.tokenizer, args.prompt_limit, args.wmt_prompts,
                            args.humaneval_prompts)
    cached = teacher_from_state(load_state(base)) if base.with_suffix(".json").is_file() else None
    known = {} if cached is None else {(p.source, p.ident): i for i, p in enumerate(cached.prompts)}
    missing = [p for p in prompts if (p.source, p.ident) not in known]
    print(f"teacher: {len(prompts)} prompts, {len(prompts) - len(missing)} answered in {base}.json",
          flush=True)
    if missing:
        model = loaded.model
        if args.teacher_dtype == "bfloat16":
            model = copy.deepcopy(model).to(torch.bfloat16)
        new_tokens = args.self_generate or 64
        print(f"teacher: answering {len(missing)}, {new_tokens} new tokens each, "
              f"batches of {args.generate_batch}, {args.teacher_dtype}", flush=True)
        fresh = generate_teacher(model, loaded.tokenizer, missing, new_tokens, args.generate_batch,
                                 args.top_k, loaded.eos_token_ids)
        cached = fresh if cached is None else TeacherData(
            cached.prompts + fresh.prompts, cached.paths + fresh.paths, cached.top_ids + fresh.top_ids,
            cached.top_logits + fresh.top_logits)
        save_state(base, teacher_state(cached))
        known = {(p.source, p.ident): i for i, p in enumerate(cached.prompts)}
    assert cached is not None
    order = [known[(p.source, p.ident)] for p in prompts]
    return TeacherData([cached.prompts[i] for i in order], [cached.paths[i] for i in order],
                       [cached.top_ids[i] for i in order], [cached.top_logits[i] for i in order])


def _data_dir(paths: list[Path]) -> Path:
    folders = {p if p.is_dir() else p.parent for p in paths}
    for folder in folders:
        if (folder / "specbench_questions.jsonl").is_file():
            return folder
    raise TrainDraftError("--from-target needs --data naming the folder with specbench_questions.jsonl, "
                          "wmt_de_en.json and humaneval.json (e.g. ../shared/data)")


def train_from_target(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_target(args)
    target = loaded.model
    data = teacher_data(args, loaded)
    held_out = [i for i, p in enumerate(data.prompts) if p.held_out]
    labels = scoring_labels(target, data, held_out, args.out / LABELS)
    train = [i for i, p in enumerate(data.prompts) if not p.held_out and data.paths[i]]
    layers = parse_layers(args.layers, int(target.config.num_hidden_layers))
    subset = vocabulary_subset(data, train, args.vocab_subset, int(target.config.vocab_size),
                               loaded.eos_token_ids)
    draft = draft_from_target(target, layers, subset)
    remap = torch.full((int(target.config.vocab_size),), -1, dtype=torch.long)
    remap[torch.tensor(subset)] = torch.arange(len(subset))
    coverage = _coverage(data, train, set(subset))
    start, evals, best = _resume(args, draft)
    if start == 0:
        scores = evaluate(draft, data, held_out, labels)
        print(f"before: {_headline(scores)}", flush=True)
        evals = [{"step": 0, **scores}]
        best = {"step": 0, "agreement": scores["overall"]["agreement"]}
        _save_best(args, draft, loaded, subset, evals)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    if start:
        optimizer.load_state_dict(load_state(args.out / CHECKPOINT / "optimizer"))
    rng = np.random.default_rng(args.seed)
    order = _batches(train, args.batch_size, args.steps, rng)
    started = time.monotonic()
    draft.train()
    for step in range(start, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, args)
        loss = batch_loss(draft, data, order[step], args.context, remap, args.hard_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        if done % 10 == 0:
            print(f"step {done}/{args.steps} loss {loss.item():.4f} {time.monotonic() - started:.0f} s",
                  flush=True)
        if done % args.checkpoint_every == 0 or done == args.steps:
            scores = evaluate(draft, data, held_out, labels)
            evals.append({"step": done, "loss": round(loss.item(), 4), **scores})
            print(f"step {done}: {_headline(scores)}", flush=True)
            if scores["overall"]["agreement"] > best["agreement"]:
                best = {"step": done, "agreement": scores["overall"]["agreement"]}
                _save_best(args, draft, loaded, subset, evals)
            _checkpoint(args, draft, optimizer, done, evals, best)
    report = {"settings": {k: [str(p) for p in v] if k == "data" else str(v) if isinstance(v, Path) else v
                           for k, v in vars(args).items()
                           if k not in ("handler", "needs_settings", "func", "command")},
              "layers": layers, "vocab_subset": len(subset), "subset_coverage_of_train_answers": coverage,
              "data": _data_record(data, train, held_out), "before": evals[0], "best": best,
              "after": next(e for e in evals if e["step"] == best["step"]), "evals": evals,
              "train_wall_s": round(time.monotonic() - started, 1), "threads": args.threads}
    (args.out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    shutil.copy2(args.out / REPORT, args.out / SHIPPED / "training.json")
    return report


def _lr(step: int, args: argparse.Namespace) -> float:
    warm = max(1, int(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, args.steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(train: list[int], size: int, steps: int, rng: np.random.Generator) -> list[list[int]]:
    """Epochs of shuffled answers, cut into batches (the same for a resumed run)."""
    flat: list[int] = []
    while len(flat) < steps * size:
        flat += [train[int(i)] for i in rng.permutation(len(train))]
    return [flat[s * size:(s + 1) * size] for s in range(steps)]


def _coverage(data: TeacherData, train: list[int], subset: set[int]) -> float:
    tokens = [t for i in train for t in data.paths[i]]
    return round(sum(t in subset for t in tokens) / max(1, len(tokens)), 4)


def _data_record(data: TeacherData, train: list[int], held_out: list[int]) -> dict[str, Any]:
    def count(indices: list[int]) -> dict[str, Any]:
        by: Counter[str] = Counter(data.prompts[i].category for i in indices)
        return {"answers": len(indices), "tokens": sum(len(data.paths[i]) for i in indices),
                "by_category": dict(by)}

    return {"train": count(train), "held_out": count(held_out),
            "held_out_rule": "Spec-Bench question_id % 4 == 0 (scored only, never trained on)"}


def _save_best(args: argparse.Namespace, draft: Any, loaded: Any, subset: list[int],
               evals: list[dict[str, Any]]) -> None:
    tmp = args.out / (BEST + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_full_folder(draft, loaded.tokenizer, tmp)
    _replace(tmp, args.out / BEST)
    meta = _shipped_meta(args)
    tmp = args.out / (SHIPPED + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_shipped(draft, args.out / BEST, tmp, meta)
    (tmp / "training.json").write_text(json.dumps({"evals": evals}, indent=1) + "\n")
    _replace(tmp, args.out / SHIPPED)


def _shipped_meta(args: argparse.Namespace) -> dict[str, Any]:
    gguf = getattr(args, "target_gguf", "")
    meta: dict[str, Any] = {"embedding_tensor": "token_embd.weight"}
    if gguf:
        path = Path(gguf)
        meta.update({"target_package": args.target_package, "target_file": path.name,
                     "target_sha256": file_sha256(path)})
    return meta


def _replace(tmp: Path, folder: Path) -> None:
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint(args: argparse.Namespace, draft: Any, optimizer: Any, step: int,
                evals: list[dict[str, Any]], best: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = args.out / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in draft.state_dict().items()}, str(tmp / "weights.safetensors"))
    save_state(tmp / "optimizer", optimizer.state_dict())
    (tmp / "trainer.json").write_text(json.dumps({"step": step, "evals": evals, "best": best}))
    _replace(tmp, args.out / CHECKPOINT)
    print(f"checkpoint step {step}", flush=True)


def _resume(args: argparse.Namespace, draft: Any) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    folder = args.out / CHECKPOINT
    if not folder.is_dir():
        return 0, [], {}
    if not args.resume:
        raise TrainDraftError(f"{folder} exists: pass --resume to continue that run, or choose another --out")
    from safetensors.torch import load_file

    state = load_file(str(folder / "weights.safetensors"))
    draft.load_state_dict(state, strict=False)
    head = draft.get_output_embeddings()
    head.weight.data.copy_(state["lm_head.weight"])
    trainer = json.loads((folder / "trainer.json").read_text())
    print(f"resumed at step {trainer['step']} of {args.steps}", flush=True)
    return int(trainer["step"]), trainer["evals"], trainer["best"]
