"""The real pair, one session, side by side in one process: target-only, HF assisted, specd.

For each held-out Spec-Bench question (``question_id % 4 == 0``: never trained on by the shipped
draft), chat-templated, greedy, ``--max-new-tokens``:

* ``target``: the target's own ``generate`` (HF, greedy, KV cache);
* ``hf_assisted``: ``target.generate(assistant_model=draft)`` with ``--hf-draft`` (default the
  product's draft smollm2-135m-int4, the target in 4-bit weights; the distilled
  smollm2-135m-draft's reduced head returns full-vocabulary logits with -inf outside its subset,
  so it is a valid HF assistant too). transformers' assisted generation takes
  a standalone draft model only: it has no way to hand a draft the target's hidden state;
* ``specd_target``: ``specd generate --mode target``'s path (the verifier's engine, one pass per
  token, its own copy of the target), the baseline specd's speculation is measured against;
* ``specd``: ``specd generate``'s speculative path (an edge with ``--draft``, default
  smollm2-135m-int4; a feature draft's folder works too, see docs/drafters.md, and a verifier
  worker in this process, through an embedded
  Redis), fixed gamma;
* ``specd_plain`` (with ``--specd-plain``): the same with ``--hf-draft`` as specd's draft, so
  both systems run the very same pair.

One torch thread for everything; the three run in rotating order per question and repetition so
machine noise hits them alike; every run is reported, and every specd/assisted output is checked
equal to the target's. Tokens/s counts generated tokens over wall time of the generation alone.

    PYTHONPATH=. python benchmarks/real_pair.py --per-category 2 --reps 3 \
        --out benchmarks/results/real_pair_int4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES: tuple[str, ...] = ("target", "hf_assisted", "specd_target", "specd")


def held_out_questions(path: Path, per_category: int) -> list[dict[str, Any]]:
    from specd.draft_teacher import specbench_group

    chosen: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            group = specbench_group(q["category"])
            if int(q["question_id"]) % 4 == 0 and len(chosen.setdefault(group, [])) < per_category:
                chosen[group].append({"id": q["question_id"], "category": group, "text": q["turns"][0]})
    return [q for group in sorted(chosen) for q in chosen[group]]


def prompt_ids(tokenizer: Any, text: str, limit: int) -> list[int]:
    from specd.draft_teacher import chat_ids

    return chat_ids(tokenizer, text, limit)


@torch.inference_mode()
def hf_generate(target: Any, ids: list[int], new: int, eos: list[int], assistant: Any = None,
                gamma: int = 4) -> tuple[list[int], float]:
    kwargs: dict[str, Any] = {}
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = gamma
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        kwargs["assistant_model"] = assistant
    x = torch.tensor([ids])
    started = time.perf_counter()
    out = target.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos[0], **kwargs)
    elapsed = time.perf_counter() - started
    tokens = out[0, len(ids):].tolist()
    return tokens, elapsed


def target_engine(args: argparse.Namespace) -> Any:
    """The verifier's engine on its own copy of the target (it swaps the copy's CPU kernels)."""
    from common.models import load_causal_lm
    from verifier_worker.engine import TargetEngine

    own = load_causal_lm(args.target)
    engine = TargetEngine(own.model, own.vocab_size, args.kv_budget_tokens)
    engine.warm_up(gamma=0)
    return engine


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from common.models import load_causal_lm
    from common.sampling import SamplingParams
    from common.settings import Settings
    from specd.generation import local_verifier, redis_url_for
    from specd.runtime import build_edge, open_broker
    from specd.workers import sampling_spec
    from verifier_worker.engine import generate_target_only

    torch.set_num_threads(1)
    settings = Settings()
    settings.models.target, settings.models.draft = args.target, args.draft
    settings.models.torch_threads = 1
    settings.pool.kv_budget_tokens = args.kv_budget_tokens  # one session: the default arena is ~12 GB here
    settings.edge.gamma, settings.edge.adaptive_gamma = args.gamma, False
    settings.sampling.temperature, settings.sampling.max_new_tokens = 0.0, args.max_new_tokens
    target = load_causal_lm(args.target)
    assistant = load_causal_lm(args.hf_draft)
    eos = sorted(target.eos_token_ids)
    engine = target_engine(args)
    questions = held_out_questions(args.data / "specbench_questions.jsonl", args.per_category)
    variants = {f"specd_c{c:g}": c for c in args.confidence}
    bars = {f"specd_o{b:g}": b for b in args.open}
    modes = MODES + (("specd_plain",) if args.specd_plain else ()) + tuple(variants) + tuple(bars)
    runs: list[dict[str, Any]] = []
    async with redis_url_for(settings) as (url, _embedded), local_verifier(settings, url):
        broker = await open_broker(settings, url)
        clients = {"specd": build_edge(settings, broker)}
        if args.specd_plain:
            plain = settings.model_copy(deep=True)
            plain.models.draft = args.hf_draft
            clients["specd_plain"] = build_edge(plain, broker)
        for mode, confidence in variants.items():  # the same draft, ending rounds on low confidence
            variant = settings.model_copy(deep=True)
            variant.edge.draft_confidence = confidence
            clients[mode] = build_edge(variant, broker)
        for mode, bar in bars.items():  # the same draft with another first-token bar (0: always draft)
            variant = settings.model_copy(deep=True)
            variant.edge.draft_open_confidence = bar
            clients[mode] = build_edge(variant, broker)
        spec = sampling_spec(settings, clients["specd"].backend.eos_token_ids)
        try:
            for rep in range(args.reps):
                for qi, q in enumerate(questions):
                    ids = prompt_ids(target.tokenizer, q["text"], args.prompt_limit)
                    shift = (qi + rep) % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        if mode == "specd_target":
                            started = time.perf_counter()
                            tokens = generate_target_only(engine, ids, SamplingParams(), target.eos_token_ids,
                                                          args.max_new_tokens)
                            elapsed, extra = time.perf_counter() - started, {}
                        elif mode in clients:
                            started = time.perf_counter()
                            result = await clients[mode].generate(ids, spec, None)
                            elapsed = time.perf_counter() - started
                            tokens, extra = result.token_ids, {
                                "acceptance_rate": round(result.acceptance_rate, 4),
                                "mean_accepted_length": round(result.mean_accepted_length, 3),
                                "rounds": result.rounds, "drafted": result.drafted,
                                "accepted": result.accepted}
                        else:
                            tokens, elapsed = hf_generate(target.model, ids, args.max_new_tokens, eos,
                                                          assistant.model if mode == "hf_assisted" else None,
                                                          args.gamma)
                            extra = {}
                        runs.append({"rep": rep, "question": q["id"], "category": q["category"], "mode": mode,
                                     "tokens": len(tokens), "seconds": round(elapsed, 3),
                                     "tokens_per_s": round(len(tokens) / elapsed, 2), "tokens_ids": tokens,
                                     **extra})
                        shown = {k: v for k, v in runs[-1].items() if k != "tokens_ids"}
                        print(json.dumps(shown), flush=True)
                    group = runs[-len(modes):]
                    reference = next(r["tokens_ids"] for r in group if r["mode"] == "target")
                    for r in group:
                        r["equal_to_target"] = r["tokens_ids"] == reference
        finally:
            await broker.close()
    return summarise(args, runs, modes)


def summarise(args: argparse.Namespace, runs: list[dict[str, Any]], modes: tuple[str, ...]) -> dict[str, Any]:
    totals: dict[str, Any] = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        tokens, seconds = sum(r["tokens"] for r in mine), sum(r["seconds"] for r in mine)
        totals[mode] = {"runs": len(mine), "tokens": tokens, "seconds": round(seconds, 2),
                        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
                        "all_equal_to_target": all(r["equal_to_target"] for r in mine)}
    base = totals["target"]["tokens_per_s"]
    own = totals["specd_target"]["tokens_per_s"]
    for mode in modes:
        totals[mode]["speedup_vs_target"] = round(totals[mode]["tokens_per_s"] / base, 3) if base else 0.0
        totals[mode]["speedup_vs_specd_target"] = round(totals[mode]["tokens_per_s"] / own, 3) if own else 0.0
    ratios: dict[str, list[float]] = {mode: [] for mode in modes[1:]}
    for rep in range(args.reps):
        for q in {r["question"] for r in runs}:
            group = {r["mode"]: r for r in runs if r["rep"] == rep and r["question"] == q}
            for mode in modes[1:]:
                ratios[mode].append(group["target"]["seconds"] / group[mode]["seconds"] *
                                    group[mode]["tokens"] / max(1, group["target"]["tokens"]))
    spec = [r for r in runs if r["mode"] == "specd"]
    drafted_rates = [r["acceptance_rate"] for r in spec]
    categories: dict[str, dict[str, float]] = {}
    for category in sorted({r["category"] for r in spec}):
        mine = [r for r in spec if r["category"] == category]
        drafted, accepted = sum(r["drafted"] for r in mine), sum(r["accepted"] for r in mine)
        categories[category] = {"acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
                                "tokens_per_round": round(sum(r["tokens"] for r in mine)
                                                          / max(1, sum(r["rounds"] for r in mine)), 3)}
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "totals": totals,
            "median_per_question_speedup": {m: round(statistics.median(v), 3)
                                            for m, v in ratios.items() if v},
            "specd_mean_acceptance_rate": round(statistics.fmean(drafted_rates), 4) if drafted_rates else 0.0,
            "specd_by_category": categories,
            "runs": [{k: v for k, v in r.items() if k != "tokens_ids"} for r in runs]}


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    lines = ["# Real pair, one session: target-only vs HF assisted vs specd", "",
             f"Settings: `{json.dumps(summary['settings'])}`", "",
             "| mode | runs | tokens | seconds | tokens/s | vs target | vs specd_target "
             "| all outputs equal target |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, t in summary["totals"].items():
        lines.append(f"| {mode} | {t['runs']} | {t['tokens']} | {t['seconds']} | {t['tokens_per_s']} | "
                     f"{t['speedup_vs_target']}x | {t['speedup_vs_specd_target']}x | "
                     f"{t['all_equal_to_target']} |")
    lines += ["", f"Median per-question speedup: {summary['median_per_question_speedup']}; "
              f"specd mean acceptance rate (accepted/drafted): {summary['specd_mean_acceptance_rate']}", "",
              "Every run:", "", "| rep | question | category | mode | tokens | s | tokens/s | acceptance |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['rep']} | {r['question']} | {r['category']} | {r['mode']} | {r['tokens']} | "
                     f"{r['seconds']} | {r['tokens_per_s']} | {r.get('acceptance_rate', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default="smollm2-135m-int4",
                        help="specd's draft (a feature draft's folder too)")
    parser.add_argument("--hf-draft", default="smollm2-135m-int4",
                        help="HF assisted generation's draft (a standalone model)")
    parser.add_argument("--specd-plain", action="store_true", help="also run specd with --hf-draft")
    parser.add_argument("--confidence", type=float, nargs="*", default=[],
                        help="also run specd with edge.draft_confidence at each of these values")
    parser.add_argument("--open", type=float, nargs="*", default=[],
                        help="also run specd with edge.draft_open_confidence at each of these values")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-limit", type=int, default=160)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--kv-budget-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_pair")
    args = parser.parse_args()
    summary = asyncio.run(run_all(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    write_markdown(summary, args.out.with_suffix(".md"))
    print(json.dumps(summary["totals"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
