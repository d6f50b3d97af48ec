"""Cost of one verification pass of the target engine at real vocabularies, depth and batch sizes.

Each of ``B`` sessions holds a cached context of ``L`` tokens and sends a draft of ``gamma``
tokens; one pass verifies them all. The target is a random-weight Llama-shaped model (no
download) whose output logits are scaled to a trained model's spread (std ~3, so top-p keeps a
realistic nucleus, not the whole vocabulary), at the real vocabulary sizes of Llama-3 (128,256)
and Qwen2 (151,936). Greedy sessions, or sampled ones (temperature 0.8, top-p 0.95, a sparse
draft distribution of 32 tokens). Reported per configuration: median ``verify()`` milliseconds,
the model forward's milliseconds inside it and their ratio, and the torch ops dispatched by one
pass (a ``TorchDispatchMode`` counter: on a GPU each is a kernel launch).

Caches are filled directly with random keys/values (a prefill of 64 x 2,048 tokens would take
minutes on a CPU and is not what is measured). Each configuration runs in a fresh subprocess per
engine tree, alternating trees, so an older checkout is measured side by side in one run:

    git archive <old-commit> | tar -x -C /tmp/old_engine
    PYTHONPATH=. python benchmarks/engine_pass.py --compare /tmp/old_engine

The bundled pair's rows of earlier runs came from ``--target-model bundled:target``; any model
specd loads can be timed instead of the random one (``--target-model smollm2-135m-instruct``:
the real pair's target; its folder is resolved by this tree and loaded by path in every tree).

``--layout`` says where each session's blocks lie in a paged arena: ``consecutive`` (each
session allocated at once, so its blocks are consecutive), or ``grown`` (as a serving pool grows
them: every session prefilled with a ``--prompt``-token prompt, then all of them grown block by
block in turn up to the context, in an arena with admission's 30% growth headroom), so attention
meets the arena's real fragmentation. Trees with the older extent arena reserve each session's
extent at once either way. Each row reports the runs of consecutive blocks per session.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"
LOGIT_STD = 3.0


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def random_target(vocab: int, hidden: int, layers: int, seed: int = 0) -> Any:
    """A Llama-shaped random model whose logits have std ~``LOGIT_STD``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=8192,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.inference_mode():
        std = model(torch.randint(0, vocab, (1, 64))).logits.float().std()
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_STD / float(std))
    return model


def make_draft(engine_mod: Any, rng: np.random.Generator, vocab: int, gamma: int,
               sampled: bool) -> Any:
    ids = rng.integers(2, vocab, gamma).astype(np.uint32)
    if not sampled or not gamma:
        return engine_mod.Draft(ids, np.zeros(0, np.uint16), np.zeros(0, np.uint32),
                                np.zeros(0, np.float32))
    support = [np.unique(np.concatenate(([t], rng.integers(2, vocab, 31)))) for t in ids]
    probs = [rng.dirichlet(np.ones(s.size)).astype(np.float32) for s in support]
    return engine_mod.Draft(ids, np.array([s.size for s in support], np.uint16),
                            np.concatenate(support).astype(np.uint32), np.concatenate(probs))


def fill_caches(engine: Any, kvs: list[Any], context: int, layout: str = "consecutive",
                prompt: int = 128) -> None:
    """Give each session ``context - 1`` cached positions of random keys (any engine version)."""
    arena = engine.arena
    for tensor in [*arena.keys, *arena.values]:
        tensor.normal_()
    block = getattr(arena, "block_tokens", 0)
    if layout == "grown" and block:  # a paged arena, grown as a pool grows it
        for kv in kvs:
            arena.allocate(kv, prompt)
        for end in range(prompt + block, context + 64 + 1, block):
            for kv in kvs:
                arena.allocate(kv, end)
    for kv in kvs:
        arena.allocate(kv, context + 64)  # blocks (paged arena) or an extent (earlier versions)
        kv.length = context - 1
    if layout.startswith("runs") and block:  # deal the blocks out again: N runs per session
        deal_runs(kvs, int(layout[4:]))


def deal_runs(kvs: list[Any], runs: int) -> None:
    """Re-deal the sessions' blocks round by round so each holds ``runs`` runs (timing only)."""
    per, pool = len(kvs[0].blocks), iter(sorted(b for kv in kvs for b in kv.blocks))
    tables: list[list[int]] = [[] for _ in kvs]
    for part in np.array_split(np.arange(per), runs):
        for table in tables:
            table.extend(next(pool) for _ in range(part.size))
    for kv, table in zip(kvs, tables, strict=True):
        kv.blocks[:] = table


def runs_per_session(kvs: list[Any]) -> list[int]:
    """Runs of consecutive blocks in each session's block table (1 each for an extent arena)."""
    return [1 + int(np.count_nonzero(np.diff(np.asarray(kv.blocks)) != 1))
            if getattr(kv, "blocks", None) else 1 for kv in kvs]


def load_model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process, on whichever engine PYTHONPATH points to."""
    import verifier_worker.engine as engine_mod
    from common.sampling import SamplingParams
    from verifier_worker.kv import SessionKV

    for name, value in cfg.get("engine_set", {}).items():  # e.g. MAX_RUNS=0: gather every row
        setattr(engine_mod, name, value)

    torch.set_num_threads(1)
    if cfg.get("model_path"):
        model = load_model(cfg["model_path"])
        cfg = {**cfg, "vocab": int(model.get_output_embeddings().weight.shape[0])}
    else:
        model = random_target(cfg["vocab"], cfg["hidden"], cfg["layers"])
    batch, context, gamma = cfg["batch"], cfg["context"], cfg["gamma"]
    layout = cfg.get("layout", "consecutive")
    budget = batch * (context + 64) + 64
    if layout == "grown":
        budget = int(budget / 0.7)  # the growth headroom admission leaves
    engine = engine_mod.TargetEngine(model, cfg["vocab"], kv_budget_tokens=budget)
    sampled = cfg["mode"] == "sampled"
    params = [SamplingParams(0.8, 0.95, 0, seed) if sampled else SamplingParams() for seed in range(batch)]
    rng = np.random.default_rng(0)
    kvs = [SessionKV() for _ in range(batch)]
    fill_caches(engine, kvs, context, layout, cfg.get("prompt", 128))
    runs = runs_per_session(kvs)
    contexts = [rng.integers(2, cfg["vocab"], context).tolist() for _ in range(batch)]
    spans: list[float] = []
    started: list[float] = []
    model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    model.register_forward_hook(lambda *_: spans.append(time.perf_counter() - started[-1]))

    def one_pass(seq: int) -> float:
        for kv in kvs:
            kv.truncate(context - 1)
        drafts = [make_draft(engine_mod, rng, cfg["vocab"], gamma, sampled) for _ in kvs]
        requests = [engine_mod.VerifyRequest(kv, ctx, draft, p, seq)
                    for kv, ctx, draft, p in zip(kvs, contexts, drafts, params, strict=True)]
        begin, cpu = time.perf_counter(), time.thread_time()
        engine.verify(requests)
        cpus.append(time.thread_time() - cpu)  # this thread's CPU time: robust to a shared machine
        return time.perf_counter() - begin

    cpus: list[float] = []
    one_pass(0)  # warm-up
    totals = [one_pass(seq) for seq in range(1, cfg["passes"] + 1)]
    cpu_ms = [round(t * 1e3, 1) for t in cpus[1:]]
    forwards = spans[1:]
    counter = OpCounter()
    with counter:
        one_pass(cfg["passes"] + 1)
    total, forward = statistics.median(totals), statistics.median(forwards)
    plain = plain_forward_ms(model, batch, context, gamma, cfg["passes"]) if cfg.get("plain") else None
    return {**{k: cfg[k] for k in ("vocab", "batch", "context", "gamma", "mode")},
            "layout": layout, "runs_per_session_max": max(runs),
            "runs_per_session_mean": round(statistics.mean(runs), 2),
            "verify_ms": round(total * 1e3, 1), "forward_ms": round(forward * 1e3, 1),
            "verify_ms_all": [round(t * 1e3, 1) for t in totals],
            "verify_cpu_ms": statistics.median(cpu_ms), "verify_cpu_ms_all": cpu_ms,
            "forward_ms_all": [round(t * 1e3, 1) for t in forwards],
            "verify_over_forward": round(total / forward, 3), "ops_per_pass": counter.ops,
            **({"plain_forward_ms": round(plain, 1), "forward_over_plain": round(forward * 1e3 / plain, 3)}
               if plain else {})}


def plain_forward_ms(model: Any, batch: int, context: int, gamma: int, passes: int) -> float:
    """The plain model's forward of the same tokens: ``batch`` rows of ``gamma + 1`` new tokens on
    a transformers ``DynamicCache`` of ``context - 1`` positions per row (rectangular, contiguous:
    what one padded batch of equal sessions costs without any paging), SDPA attention."""
    from transformers import DynamicCache

    config = model.config
    kv_heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(batch, kv_heads, context - 1, dim),
                     torch.randn(batch, kv_heads, context - 1, dim), layer)
    ids = torch.randint(2, config.vocab_size, (batch, gamma + 1))
    positions = torch.arange(context - 1, context + gamma)[None].expand(batch, -1)
    times = []
    with torch.inference_mode():
        for _ in range(passes + 1):
            begin = time.perf_counter()
            model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                  logits_to_keep=gamma + 1)
            times.append(time.perf_counter() - begin)
            excess = cache.get_seq_length() - (context - 1)
            cache.crop(-excess)  # negative: tokens to drop (every transformers version)
    return statistics.median(times[1:]) * 1e3


def configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    grid = itertools.product(args.vocabs.split(","), args.contexts.split(","), args.modes.split(","),
                             args.batches.split(","), args.layouts.split(","))
    path = ""
    if args.target_model:
        from common.models import resolve_model_path

        path = str(resolve_model_path(args.target_model))
    return [{"vocab": int(v), "context": int(c), "mode": m, "batch": int(b), "gamma": args.gamma,
             "hidden": args.hidden, "layers": args.layers, "passes": args.passes, "plain": args.plain,
             "layout": layout, "prompt": args.prompt, "model_path": path}
            for v, c, m, b, layout in grid]


def engine_settings(pairs: list[str]) -> dict[str, int]:
    return {name: int(value) for name, value in (pair.split("=") for pair in pairs if pair)}


def run_in(tree: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """``tree`` may end in ``@NAME=INT[@NAME=INT...]``: engine constants set in that run."""
    tree, *pairs = tree.split("@")
    cfg = {**cfg, "engine_set": engine_settings(pairs)}
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], env=env, check=True,
                         capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def save(out: Path, key: str, report: dict[str, Any]) -> None:
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[key] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="128256,151936")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--modes", default="greedy,sampled")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--compare", default="", help="older checkouts to run side by side (comma-separated)")
    parser.add_argument("--plain", action="store_true",
                        help="also time the plain model forward of the same tokens on a DynamicCache")
    parser.add_argument("--target-model", default="",
                        help="time this model (any name specd loads) instead of a random one")
    parser.add_argument("--layouts", default="consecutive",
                        help="consecutive and/or grown (comma-separated; see the module docstring)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of the grown layout")
    parser.add_argument("--reps", type=int, default=1,
                        help="repetitions of the whole grid, trees alternating (order reversed "
                             "every other repetition)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                        help="set a verifier_worker.engine constant in this tree's runs "
                             "(e.g. MAX_RUNS=0); a --compare entry 'path@NAME=INT' sets its own")
    parser.add_argument("--label", default="paged")
    parser.add_argument("--old-label", default="before (extent arena, per-session loops)",
                        help="their labels (comma-separated, in the same order)")
    parser.add_argument("--out", default=str(RESULTS / "engine_pass.json"))
    parser.add_argument("--key", default="real_scale", help="entry of the results file to write")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_config(json.loads(args.one))), flush=True)
        return 0
    here = "@".join([str(Path(__file__).resolve().parents[1]), *args.set])
    olds = [t for t in args.compare.split(",") if t]
    labels = args.old_label.split(",") if len(olds) > 1 else [args.old_label]
    trees = [(args.label, here)] + [(label, "@".join([str(Path(t.split("@")[0]).resolve()),
                                                      *t.split("@")[1:]]))
                                    for label, t in zip(labels, olds, strict=True)]
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    shape = (f"random-weight Llama: hidden {args.hidden}, {args.layers} layers, "
             f"{max(1, args.hidden // 64)} query / {max(1, args.hidden // 128)} KV heads, fp32, "
             f"logit std {LOGIT_STD}") if not args.target_model else f"{args.target_model}, fp32"
    for rep in range(args.reps):
        for cfg in configs(args):
            for label, tree in (trees if rep % 2 == 0 else trees[::-1]):
                rows[label].append({"rep": rep, **run_in(tree, cfg)})
                print(json.dumps({"engine": label, **rows[label][-1]}), flush=True)
            save(Path(args.out), args.key, {  # after every configuration: a cut-short run keeps its rows
                "model": shape, "gamma": args.gamma,
                "command": " ".join(sys.argv[1:] if argv is None else argv),
                "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), 1 torch thread, "
                           f"torch {torch.__version__}", "engines": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
