"""Drafters benchmark: each single drafter, prompt lookup, and the router on a mixed prompt set.

    PYTHONPATH=. python benchmarks/drafters.py                      # full run (see --help)
    PYTHONPATH=. python benchmarks/drafters.py --per-category 1 --max-new-tokens 16   # seconds

Prompts (from ``--data``, default ../shared/data): HumanEval code, and Spec-Bench summarization,
RAG, translation and chat (the MT-Bench and QA first turns), ``--per-category`` each, taken in a
fixed shuffled order so the categories are mixed. Prompts longer than ``--max-prompt-tokens``
keep their head and tail halves (the instruction of a summary is at the start, the question of
a RAG prompt at the end).

Drafters: the bundled code draft, the bundled English draft (``bundled:draft_en``), prompt
lookup alone, prompt lookup beside each model draft, the router over all of them, and, with
``--target-only``, the target alone (gamma 0; otherwise its greedy output is computed untimed,
as the reference). One verifier (the bundled target) serves every session
through an embedded Redis; sessions run one at a time and, for every prompt, each drafter in
turn (round robin), so machine noise hits all of them alike. Greedy decoding: every drafter's
output must equal the target-only output (checked). The router learns as the run goes on (its
first sessions of a prompt class explore), as it would in production.

tokens/s per category = tokens / wall seconds of its sessions; acceptance = accepted / drafted;
tokens per round = tokens / rounds. Writes benchmarks/results/drafters.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from broker.embedded import EmbeddedRedis  # noqa: E402
from common.logs import configure_logging  # noqa: E402
from common.models import encode_prompt  # noqa: E402
from common.settings import Settings  # noqa: E402
from common.wire import SamplingSpec  # noqa: E402
from edge_worker.backends import DraftBackend, create_backend  # noqa: E402
from edge_worker.client import EdgeClient  # noqa: E402
from specd.runtime import build_verifier, edge_config, make_broker  # noqa: E402

CHAT = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities", "qa"}
CATEGORIES = ("code", "summarization", "rag", "translation", "chat")


def load_prompts(data: Path, per_category: int, seed: int) -> list[tuple[str, str]]:
    """(category, prompt) pairs, ``per_category`` each, mixed in a seeded order."""
    pools: dict[str, list[str]] = defaultdict(list)
    for record in json.loads((data / "humaneval.json").read_text()):
        pools["code"].append(record["prompt"])
    for line in (data / "specbench_questions.jsonl").read_text().splitlines():
        record = json.loads(line)
        category = "chat" if record["category"] in CHAT else record["category"]
        if category in CATEGORIES:
            pools[category].append(record["turns"][0])
    rng = random.Random(seed)
    chosen = [(c, p) for c in CATEGORIES for p in rng.sample(pools[c], min(per_category, len(pools[c])))]
    rng.shuffle(chosen)
    return chosen


def clip(ids: list[int], limit: int) -> list[int]:
    return ids if len(ids) <= limit else ids[:limit // 2] + ids[-(limit - limit // 2):]


def drafter_specs(draft: str, draft_en: str,
                  target_only: bool) -> dict[str, list[dict[str, Any]] | dict[str, Any]]:
    """Each configuration: a single backend (dict) or the router's ``edge.drafts`` (list).

    An empty ``draft_en`` (one model draft, as the real pair has) drops its configurations."""
    if not draft_en:
        return {**({"target_only": {"kind": "torch", "model": draft, "gamma": 0}} if target_only else {}),
                "draft": {"kind": "torch", "model": draft},
                "lookup": {"kind": "prompt_lookup", "model": draft},
                "lookup+draft": {"kind": "prompt_lookup", "model": draft, "with_model": True},
                "router": [{"name": "draft", "model": draft},
                           {"name": "lookup", "backend": "prompt_lookup", "model": draft},
                           {"name": "lookup+draft", "backend": "prompt_lookup", "model": draft,
                            "fallback": "draft", "domains": ["long"]}]}
    router = [{"name": "draft", "model": draft, "domains": ["code"]},
              {"name": "draft_en", "model": draft_en, "domains": ["prose"]},
              {"name": "lookup", "backend": "prompt_lookup", "model": draft},
              {"name": "lookup+draft", "backend": "prompt_lookup", "model": draft, "fallback": "draft"},
              {"name": "lookup+draft_en", "backend": "prompt_lookup", "model": draft, "fallback": "draft_en",
               "domains": ["long"]}]
    reference = {"target_only": {"kind": "torch", "model": draft, "gamma": 0}} if target_only else {}
    return {**reference,
            "draft": {"kind": "torch", "model": draft},
            "draft_en": {"kind": "torch", "model": draft_en},
            "lookup": {"kind": "prompt_lookup", "model": draft},
            "lookup+draft": {"kind": "prompt_lookup", "model": draft, "with_model": True},
            "lookup+draft_en": {"kind": "prompt_lookup", "model": draft_en, "with_model": True},
            "router": router}


def build_backend(spec: list[dict[str, Any]] | dict[str, Any], draft: str) -> DraftBackend:
    if isinstance(spec, list):
        return create_backend("router", draft, drafts=spec)
    return create_backend(spec["kind"], spec["model"], lookup_with_model=spec.get("with_model", False))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    configure_logging("warning")  # a log line per round would be part of what is timed
    prompts = load_prompts(args.data, args.per_category, args.seed)
    specs = drafter_specs(args.draft, args.draft_en, args.target_only)
    with EmbeddedRedis() as redis:
        settings = Settings(redis={"url": redis.url, "key_prefix": "bench-drafters"},
                            models={"target": args.target, "draft": args.draft},
                            verifier={"idle_block_ms": 5},
                            edge={"gamma": args.gamma, "verdict_timeout_s": 120})
        verifier_broker, edge_broker = make_broker(settings), make_broker(settings)
        verifier = build_verifier(settings, verifier_broker, worker_id="v-bench-drafters")
        stop = asyncio.Event()
        task = asyncio.create_task(verifier.run(stop))
        clients = {}
        for name, spec in specs.items():
            config = edge_config(settings)
            if isinstance(spec, dict) and "gamma" in spec:
                config = dataclasses.replace(config, gamma=spec["gamma"])
            clients[name] = EdgeClient(build_backend(spec, args.draft), edge_broker, config, 1)
        try:
            rows = await _sessions(clients, prompts, verifier, args)
        finally:
            stop.set()
            await task
            await verifier_broker.close()
            await edge_broker.close()
    return _report(rows, clients["router"].backend, prompts, args)


def _target_greedy(verifier: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    """The target's own greedy output (untimed: the reference every drafter must reproduce)."""
    from common.sampling import SamplingParams
    from verifier_worker.engine import generate_target_only

    return generate_target_only(verifier.engine, ids, SamplingParams(), frozenset(), max_new_tokens)


async def _sessions(clients: dict[str, EdgeClient], prompts: list[tuple[str, str]], verifier: Any,
                    args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    tokenizer = clients["draft"].backend.tokenizer  # every drafter shares it (the router checks)
    for index, (category, text) in enumerate(prompts):
        ids = clip(encode_prompt(tokenizer, text, args.chat), args.max_prompt_tokens)
        outputs = {}
        for name, client in clients.items():
            started = time.perf_counter()
            result = await client.generate(ids, SamplingSpec(max_new_tokens=args.max_new_tokens))
            rows.append({"prompt": index, "category": category, "drafter": name,
                         "tokens": len(result.token_ids), "wall_s": time.perf_counter() - started,
                         "rounds": result.rounds, "drafted": result.drafted, "accepted": result.accepted})
            outputs[name] = result.token_ids
        reference = outputs.get("target_only") or _target_greedy(verifier, ids, args.max_new_tokens)
        same = all(out == reference for out in outputs.values())
        rows[-1]["identical"] = same
        if not same:
            raise SystemExit(f"prompt {index}: drafters disagree with the target-only output")
        print(f"[{index + 1}/{len(prompts)}] {category}: " + " ".join(
            f"{r['drafter']}={r['tokens'] / r['wall_s']:.0f}" for r in rows[-len(clients):]), flush=True)
    return rows


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, float]:
    tokens, wall = sum(r["tokens"] for r in rows), sum(r["wall_s"] for r in rows)
    drafted, accepted, rounds = (sum(r[k] for r in rows) for k in ("drafted", "accepted", "rounds"))
    return {"sessions": len(rows), "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
            "acceptance": round(accepted / drafted, 4) if drafted else 0.0,
            "tokens_per_round": round(tokens / rounds, 3) if rounds else 0.0}


def _report(rows: list[dict[str, Any]], router: Any, prompts: list[tuple[str, str]],
            args: argparse.Namespace) -> dict[str, Any]:
    drafters = list(dict.fromkeys(r["drafter"] for r in rows))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in drafters:
        mine = [r for r in rows if r["drafter"] == name]
        table[name] = {c: _aggregate([r for r in mine if r["category"] == c]) for c in CATEGORIES}
        table[name]["overall"] = _aggregate(mine)
    singles = [d for d in drafters if d not in ("router", "target_only")]
    best_single = max(singles, key=lambda d: table[d]["overall"]["tokens_per_s"])
    reports = list(router.reports)
    picks: dict[str, Counter[str]] = defaultdict(Counter)
    for (category, _), report in zip(prompts, reports, strict=True):
        picks[category][report["final"]] += 1
    beats = [c for c in CATEGORIES
             if table["router"][c]["tokens_per_s"] > max(table[d][c]["tokens_per_s"] for d in singles)]
    return {"settings": {k: str(v) for k, v in vars(args).items()}, "table": table,
            "best_single_overall": best_single,
            "router_overall_vs_best_single": round(table["router"]["overall"]["tokens_per_s"]
                                                   / table[best_single]["overall"]["tokens_per_s"], 4),
            "router_strictly_above_every_single_in": beats,
            "router_final_picks": {c: dict(v) for c, v in picks.items()},
            "router_switches": sum(r["switches"] for r in reports),
            "outputs_identical_to_target_only": all(r.get("identical", True) for r in rows),
            "router_sessions": reports, "torch": torch.__version__}


def markdown(report: dict[str, Any]) -> str:
    table = report["table"]
    settings = report["settings"]
    lines = ["# Drafters on a mixed prompt set", "",
             f"`python benchmarks/drafters.py {settings.get('argv', '')}`".replace(" `", "`")
             + f" (greedy, gamma {settings['gamma']}, {settings['max_new_tokens']} new tokens,"
             f" {settings['per_category']} prompts per category; every output equals target-only:"
             f" {report['outputs_identical_to_target_only']}).", "",
             "tokens/s (acceptance, tokens per round):", "",
             "| drafter | " + " | ".join([*CATEGORIES, "overall"]) + " |",
             "|---|" + "---|" * (len(CATEGORIES) + 1)]
    for name, cells in table.items():
        lines.append(f"| {name} | " + " | ".join(
            _cell(cells[c]) for c in [*CATEGORIES, "overall"]) + " |")
    lines += ["", f"Best single drafter overall: **{report['best_single_overall']}**; router / best single "
              f"overall tokens/s: **{report['router_overall_vs_best_single']}**; router strictly above every "
              f"single drafter in: {', '.join(report['router_strictly_above_every_single_in']) or 'none'}.",
              "", "Router's final pick per category: " + "; ".join(
                  f"{c}: {dict(v)}" for c, v in report["router_final_picks"].items())
              + f"; switches within sessions: {report['router_switches']}.", ""]
    return "\n".join(lines)


def _cell(cell: dict[str, float]) -> str:
    return f"{cell['tokens_per_s']:.1f} ({cell['acceptance']:.2f}, {cell['tokens_per_round']:.2f})"


def default_data() -> Path:
    """``../shared/data`` beside the clone (CI), or beside the folder holding it (worktrees)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    return ROOT.parent / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--target", default="bundled:target")
    parser.add_argument("--draft", default="bundled:draft")
    parser.add_argument("--draft-en", default="bundled:draft_en",
                        help="a second model draft for prose; empty: only --draft (the real pair)")
    parser.add_argument("--chat", action="store_true", help="prompts through the target's chat template")
    parser.add_argument("--per-category", type=int, default=6)
    parser.add_argument("--target-only", action="store_true",
                        help="also time the target alone (gamma 0); else its output is only the reference")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=640)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "drafters")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    report["settings"]["argv"] = " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
