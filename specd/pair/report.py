"""Measure how well the bundled tiny draft matches its target, and what a draft step costs.

On held-out standard-library files (the training split) and on the HumanEval prompts, with the
true prefix fed to both models (teacher forcing), it reports per model the loss (nats/token), and
per position the greedy agreement (argmax of draft == argmax of target) and the sampling
acceptance at temperature 1 (sum over the vocabulary of min(p, q)). It times one incremental
single-token step with a KV cache at batch 1 on one torch thread for each model, and derives the
expected tokens per speculative round, (1 - a^(g+1)) / (1 - a), for gamma 2..8.

Run: ``python -m specd.pair.report`` (or ``python benchmarks/pair_report.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.models import forward_with_cache
from specd.pair.options import REPORT_DESCRIPTION, add_report_arguments
from specd.pair.train import DRAFT_DIR, TARGET_DIR, encode_documents, folder_bytes, load_corpus

GAMMAS = range(2, 9)
SAMPLE_PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:")


def load_pair(folder: Path):
    """Load target, draft (float32, eval mode) and their shared tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / TARGET_DIR)
    draft_tokenizer = AutoTokenizer.from_pretrained(folder / DRAFT_DIR)
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("target and draft tokenizers differ")
    models = [
        AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32).eval()
        for name in (TARGET_DIR, DRAFT_DIR)
    ]
    return models[0], models[1], tokenizer


def heldout_sequences(stream: np.ndarray, window: int, max_tokens: int) -> list[list[int]]:
    """About ``max_tokens`` tokens of ``stream`` as evenly spaced ``window + 1``-token slices."""
    count = max(1, min(max_tokens // window, (len(stream) - 1) // window))
    starts = np.linspace(0, len(stream) - window - 1, count).astype(int)
    return [stream[s : s + window + 1].tolist() for s in starts]


def humaneval_sequences(tokenizer, path: Path, limit: int) -> list[list[int]]:
    """HumanEval prompts, each preceded by ``<|eos|>`` (the document separator in training)."""
    problems = json.loads(path.read_text())[:limit]
    eos = tokenizer.eos_token_id
    return [[eos, *tokenizer(p["prompt"])["input_ids"]] for p in problems]


@torch.no_grad()
def compare(target, draft, sequences: list[list[int]]) -> dict:
    """Teacher-forced loss, greedy agreement and T=1 acceptance over all predicted positions."""
    sums = {"target_nll": 0.0, "draft_nll": 0.0, "agree": 0.0, "accept": 0.0}
    positions = 0
    for seq in sequences:
        ids = torch.tensor([seq])
        log_p = F.log_softmax(target(input_ids=ids[:, :-1]).logits[0].float(), dim=-1)
        log_q = F.log_softmax(draft(input_ids=ids[:, :-1]).logits[0].float(), dim=-1)
        labels = ids[0, 1:]
        sums["target_nll"] -= log_p.gather(1, labels[:, None]).sum().item()
        sums["draft_nll"] -= log_q.gather(1, labels[:, None]).sum().item()
        sums["agree"] += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        sums["accept"] += torch.minimum(log_p, log_q).exp().sum().item()
        positions += len(labels)
    return {
        "target_loss": sums["target_nll"] / positions,
        "draft_loss": sums["draft_nll"] / positions,
        "greedy_agreement": sums["agree"] / positions,
        "acceptance_t1": sums["accept"] / positions,
        "positions": positions,
        "sequences": len(sequences),
    }


def crop_to(cache, keep: int) -> None:
    """Drop cached positions beyond ``keep`` (transformers 5.23 takes a negative count)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()  # as the edge backend and the verifier engine run their models
def step_times(models: dict, prefix: list[int], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per single-token cached forward at batch 1, interleaving the models each round."""
    ids = torch.tensor([prefix])
    caches = {name: forward_with_cache(m, None, input_ids=ids)[1] for name, m in models.items()}
    token = torch.tensor([[prefix[-1]]])
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + rounds):
        for name, model in models.items():
            start = time.perf_counter()
            forward_with_cache(model, caches[name], input_ids=token)
            elapsed = time.perf_counter() - start
            crop_to(caches[name], len(prefix))
            if i >= warmup:
                times[name].append(elapsed)
    return times


def expected_tokens(a: float, gamma: int) -> float:
    """Expected tokens per round with per-token acceptance ``a``: (1 - a^(g+1)) / (1 - a)."""
    return float(gamma + 1) if a >= 1.0 else (1.0 - a ** (gamma + 1)) / (1.0 - a)


@torch.no_grad()
def greedy_samples(target, draft, tokenizer, new_tokens: int) -> list[dict]:
    """Greedy completions of short Python prompts from both models."""
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(prompt)["input_ids"]]])
        row = {"prompt": prompt}
        for name, model in (("target", target), ("draft", draft)):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
            )
            row[name] = prompt + tokenizer.decode(out[0, ids.size(1) :], skip_special_tokens=True)
        samples.append(row)
    return samples


def to_markdown(report: dict) -> str:
    """Render the report as markdown tables."""
    data = report["datasets"]
    names = list(data)
    lines = [
        "# Tiny pair report",
        "",
        (
            f"Pair: `{report['pair']}`; target {report['params']['target']:,} params, "
            f"draft {report['params']['draft']:,} params; shipped {report['shipped_mb']:.1f} MB."
        ),
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [
        ("target loss (nats/token)", "target_loss", "{:.3f}"),
        ("draft loss (nats/token)", "draft_loss", "{:.3f}"),
        ("greedy agreement", "greedy_agreement", "{:.3f}"),
        ("sampling acceptance T=1", "acceptance_t1", "{:.3f}"),
        ("positions", "positions", "{:,}"),
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt.format(data[n][key]) for n in names) + " |")
    cost = report["cost"]
    lines += [
        "",
        (
            f"Cost of one cached single-token step, batch 1, 1 torch thread "
            f"(median of {cost['rounds']}): target {cost['target_ms']:.2f} ms, "
            f"draft {cost['draft_ms']:.2f} ms, ratio c = {cost['ratio']:.3f}."
        ),
        "",
        "Expected tokens per round (1 - a^(g+1)) / (1 - a); a = acceptance T=1 / greedy agreement:",
        "",
        "| gamma | " + " | ".join(f"{n} T=1 | {n} greedy" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for gamma in GAMMAS:
        cells = []
        for n in names:
            per = report["expected_tokens_per_round"][n][str(gamma)]
            cells += [f"{per['acceptance_t1']:.2f}", f"{per['greedy_agreement']:.2f}"]
        lines.append(f"| {gamma} | " + " | ".join(cells) + " |")
    lines += ["", f"Greedy completions ({report['sample_tokens']} new tokens):"]
    for sample in report["samples"]:
        for name in ("target", "draft"):
            lines += ["", f"{name}, prompt {sample['prompt']!r}:", "", "```python"]
            lines += [sample[name], "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of the report."""
    parser = argparse.ArgumentParser(prog="python -m specd.pair.report", description=REPORT_DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_report_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Measure the pair and write the JSON and markdown reports."""
    torch.set_num_threads(args.threads)
    folder = Path(args.pair)
    target, draft, tokenizer = load_pair(folder)
    corpus = load_corpus()
    heldout = encode_documents(tokenizer, corpus.val_texts)
    datasets = {
        "stdlib_heldout": compare(
            target, draft, heldout_sequences(heldout, args.window, args.heldout_tokens)
        ),
        "humaneval_prompts": compare(
            target,
            draft,
            humaneval_sequences(tokenizer, Path(args.humaneval), args.humaneval_prompts),
        ),
    }
    samples = greedy_samples(target, draft, tokenizer, args.sample_tokens)

    torch.set_num_threads(1)
    prefix = heldout[:64].tolist()
    times = step_times({"target": target, "draft": draft}, prefix, args.rounds, warmup=20)
    target_s, draft_s = statistics.median(times["target"]), statistics.median(times["draft"])
    training_file = folder / "training.json"
    training = json.loads(training_file.read_text()) if training_file.exists() else {}
    report = {
        "pair": str(folder),
        "params": {
            "target": sum(p.numel() for p in target.parameters()),
            "draft": sum(p.numel() for p in draft.parameters()),
        },
        "shipped_mb": folder_bytes(folder) / 1e6,
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_matches_training": corpus.fingerprint
        == training.get("corpus", {}).get("fingerprint_sha256"),
        "datasets": datasets,
        "cost": {
            "target_ms": target_s * 1e3,
            "draft_ms": draft_s * 1e3,
            "ratio": draft_s / target_s,
            "rounds": args.rounds,
            "prefix_tokens": len(prefix),
            "threads": 1,
        },
        "expected_tokens_per_round": {
            name: {
                str(g): {
                    key: expected_tokens(stats[key], g)
                    for key in ("acceptance_t1", "greedy_agreement")
                }
                for g in GAMMAS
            }
            for name, stats in datasets.items()
        },
        "samples": samples,
        "sample_tokens": args.sample_tokens,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, no GPU",
    }
    markdown = to_markdown(report)
    for path, text in ((args.json, json.dumps(report, indent=2) + "\n"), (args.md, markdown)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
