"""Verification pass time on a GPU for a Llama-3.1-8B-shaped target, against the bandwidth floor.

The target is Llama-3.1-8B's shape (32 layers, hidden 4,096, 32 query / 8 KV heads, MLP 14,336,
vocabulary 128,256) with random bf16 weights (no download), its logits scaled to std ~3 as in
``benchmarks/engine_pass.py``. For batch sizes 1/16/64 (gamma 4, context 1,024 by default) it
reports the median ``verify()`` time, the forward inside it, the torch ops one pass dispatches,
and the memory-bandwidth floor: one pass must read every weight once plus every session's KV
cache, so ``floor = (weight bytes + batch * context * KV bytes per token) / bandwidth``. Beside
it, the same engine's plain decoding (``generate_target_only``-shaped: one token per pass, one
session) gives the cloud-only baseline's per-token time.

Not run in this project so far: no GPU was lent to the session that wrote it. Run it on a
machine with one CUDA GPU (about 16 GB of weights plus the KV arena):

    PYTHONPATH=. python benchmarks/gpu_engine.py --bandwidth-gbs 4800   # H200: 4.8 TB/s

Results: ``benchmarks/results/gpu_engine.json``. ``--layers`` fewer than 32 gives a quicker
smoke run (the floor scales with it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_pass import LOGIT_STD, OpCounter, make_draft

RESULTS = Path(__file__).resolve().parent / "results"


def llama8b(layers: int, device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.inference_mode():
        std = model(torch.randint(0, 128256, (1, 32), device=device)).logits.float().std()
        model.lm_head.weight.mul_(LOGIT_STD / float(std))
    return model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any, passes: int) -> float:
    times = []
    for _ in range(passes):
        _sync()
        started = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import verifier_worker.engine as engine_mod
    from common.sampling import SamplingParams
    from verifier_worker.kv import SessionKV

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="HBM GB/s (H200 4,800)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_engine.json"))
    parser.add_argument("--cpu-smoke", action="store_true", help="check the script on a CPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_engine: no CUDA device here; run it on a GPU machine (or --cpu-smoke)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = llama8b(args.layers, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = [int(b) for b in args.batches.split(",")]
    engine = engine_mod.TargetEngine(model, 128256,
                                     kv_budget_tokens=max(batches) * (args.context + 64) + 64)
    kv_bytes = engine.arena.bytes_per_token
    rng = np.random.default_rng(0)
    rows = []
    for mode in ("greedy", "sampled"):
        for batch in batches:
            kvs = [SessionKV() for _ in range(batch)]
            for tensor in [*engine.arena.keys, *engine.arena.values]:
                tensor.normal_()
            for kv in kvs:
                engine.arena.allocate(kv, args.context + 64)
                kv.length = args.context - 1
            contexts = [rng.integers(2, 128256, args.context).tolist() for _ in range(batch)]
            params = [SamplingParams(0.8, 0.95, 0, i) if mode == "sampled" else SamplingParams()
                      for i in range(batch)]

            def one_pass(kvs: list[Any] = kvs, contexts: list[list[int]] = contexts,
                         params: list[Any] = params, mode: str = mode) -> None:
                for kv in kvs:
                    kv.truncate(args.context - 1)
                engine.verify([engine_mod.VerifyRequest(
                    kv, ctx, make_draft(engine_mod, rng, 128256, args.gamma, mode == "sampled"), p, 0)
                    for kv, ctx, p in zip(kvs, contexts, params, strict=True)])

            one_pass()
            seconds = timed(one_pass, args.passes)
            counter = OpCounter()
            with counter:
                one_pass()
            floor = (weight_bytes + batch * args.context * kv_bytes) / (args.bandwidth_gbs * 1e9)
            rows.append({"mode": mode, "batch": batch, "context": args.context, "gamma": args.gamma,
                         "verify_ms": round(seconds * 1e3, 2), "floor_ms": round(floor * 1e3, 2),
                         "over_floor": round(seconds / floor, 2), "ops_per_pass": counter.ops})
            print(json.dumps(rows[-1]), flush=True)
            for kv in kvs:
                kv.clear()
    decode = _plain_decoding(engine_mod, engine, rng, args)
    report = {"model": f"Llama-3.1-8B shape, {args.layers} layers, random bf16 weights",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
              "bandwidth_gbs": args.bandwidth_gbs,
              "weight_gb": round(weight_bytes / 1e9, 2), "rows": rows, "plain_decoding": decode}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _plain_decoding(engine_mod: Any, engine: Any, rng: np.random.Generator,
                    args: argparse.Namespace) -> dict[str, float]:
    """One session, one token per pass (the cloud-only baseline), per-token time."""
    from common.sampling import SamplingParams
    from verifier_worker.kv import SessionKV

    kv, context = SessionKV(), rng.integers(2, 128256, args.context).tolist()
    first = engine.verify([engine_mod.VerifyRequest(kv, context, engine_mod.Draft.empty(),
                                                    SamplingParams(), 0)])[0]
    context.append(first.token)  # the prefill pass; decoding steps feed one token each

    def step() -> None:
        outcome = engine.verify([engine_mod.VerifyRequest(kv, context, engine_mod.Draft.empty(),
                                                          SamplingParams(), 0)])[0]
        context.append(outcome.token)

    seconds = timed(step, args.passes)
    kv.clear()
    return {"ms_per_token": round(seconds * 1e3, 2)}


if __name__ == "__main__":
    raise SystemExit(main())
