"""The 4-bit draft (``smollm2-135m-int4``): agreement with the target, and the compact decoder's speed.

Agreement: for held-out Spec-Bench questions (``question_id % 4 == 0``, the first ``--per-category``
of each group), chat-templated, the float32 target's greedy answer (``--max-new-tokens``) is
scored teacher-forced: at each answer position, does the draft's argmax equal the target's?
Two drafts: the product's (4-bit layers, 8-bit output layer) and one with a 4-bit output layer
too, the choice ``common/int4_draft.py`` explains.

Speed, one torch thread, alternated ``--reps`` times: one decode step of the 4-bit model through
transformers' forward (DynamicCache) against ``common/int4_llama.py``'s compact decoder, and a
``--prefill``-token prompt through each.

    PYTHONPATH=. python benchmarks/int4_draft.py --out benchmarks/results/int4_draft
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def questions(data: Path, per_category: int) -> list[dict[str, Any]]:
    from specd.eval.suites import read_suite

    chosen: dict[str, list[Any]] = {}
    for question in read_suite("specbench", data / "specbench_questions.jsonl"):
        if int(question.question_id) % 4 == 0:
            group = chosen.setdefault(question.category, [])
            if len(group) < per_category:
                group.append(question)
    return [q for group in chosen.values() for q in group]


@torch.inference_mode()
def agreement(target: Any, drafts: dict[str, Any], prompts: list[list[int]],
              new_tokens: int) -> dict[str, float]:
    matches = dict.fromkeys(drafts, 0)
    total = 0
    for ids in prompts:
        answer = target.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        positions = slice(len(ids) - 1, answer.shape[1] - 1)
        want = target(answer).logits[0, positions].argmax(-1)
        total += len(want)
        for name, draft in drafts.items():
            matches[name] += int((draft(answer).logits[0, positions].argmax(-1) == want).sum())
    return {name: round(count / total, 4) for name, count in matches.items()} | {"positions": total}


@torch.inference_mode()
def step_ms(model: Any, decoder: Any, prompt: list[int], steps: int) -> dict[str, float]:
    from transformers import DynamicCache

    from common.models import forward_with_cache

    cache = DynamicCache()
    start = time.perf_counter()
    out, cache = forward_with_cache(model, cache, input_ids=torch.tensor([prompt]), logits_to_keep=1)
    hf_prefill = time.perf_counter() - start
    token = int(out.logits[0, -1].argmax())
    start = time.perf_counter()
    for position in range(len(prompt), len(prompt) + steps):
        out, cache = forward_with_cache(model, cache, input_ids=torch.tensor([[token]]),
                                        position_ids=torch.tensor([[position]]), logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
    hf_step = (time.perf_counter() - start) / steps
    kv = decoder.new_cache()
    start = time.perf_counter()
    token = int(decoder.step(kv, prompt).argmax())
    compact_prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        token = int(decoder.step(kv, [token]).argmax())
    compact_step = (time.perf_counter() - start) / steps
    return {"transformers_step_ms": hf_step * 1e3, "compact_step_ms": compact_step * 1e3,
            "transformers_prefill_ms": hf_prefill * 1e3, "compact_prefill_ms": compact_prefill * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=150)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int4_draft")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from common.int4_draft import Int4Linear
    from common.int4_llama import Int4Llama
    from common.models import encode_prompt, load_causal_lm

    target = load_causal_lm("smollm2-135m-instruct")
    draft = load_causal_lm("smollm2-135m-int4")
    head4 = load_causal_lm("smollm2-135m-int4")
    head4.model.lm_head = Int4Linear.from_weight(target.model.get_output_embeddings().weight)
    prompts = [encode_prompt(target.tokenizer, q.turns[0], chat=True)[-160:]
               for q in questions(args.data, args.per_category)]
    agreed = agreement(target.model, {"int8_head": draft.model, "int4_head": head4.model}, prompts,
                       args.max_new_tokens)
    decoder = Int4Llama.of(draft.model)
    assert decoder is not None
    prompt = [3 + (7 * i) % 40000 for i in range(args.prefill)]
    runs = [step_ms(draft.model, decoder, prompt, args.steps) for _ in range(args.reps)]
    speed = {key: [round(run[key], 2) for run in runs] for key in runs[0]}
    result = {"config": vars(args) | {"data": str(args.data), "out": str(args.out)},
              "agreement": agreed, "questions": len(prompts), "speed_ms": speed,
              "median_ms": {key: round(statistics.median(values), 2) for key, values in speed.items()}}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# The 4-bit draft: agreement and the compact decoder", "",
             "`PYTHONPATH=. python benchmarks/int4_draft.py` (one torch thread)", "",
             f"Teacher-forced greedy agreement with the float32 target, {len(prompts)} held-out Spec-Bench "
             f"questions, {agreed['positions']} answer positions: 8-bit output layer (the product's) "
             f"**{agreed['int8_head']}**, 4-bit output layer {agreed['int4_head']}.", "",
             "| ms | " + " | ".join(speed) + " |", "|---|" + "---|" * len(speed)]
    lines += [f"| run {i} | " + " | ".join(str(speed[k][i]) for k in speed) + " |" for i in range(args.reps)]
    lines += ["| median | " + " | ".join(str(result["median_ms"][k]) for k in speed) + " |", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
