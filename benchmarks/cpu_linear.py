"""MKL's float32 linear against oneDNN's, per product and per verifier pass, on this CPU.

Two tables, one torch thread, alternating the two kernels within one process:

* **products**: ``F.linear`` (MKL) against ``torch.ops.mkldnn._linear_pointwise`` (oneDNN) for
  the weight shapes of the shipped models, at the row counts of a draft step, a verification
  pass and a prefill. Each timing runs distinct weights (``--megabytes`` of them) back to back,
  so they stream from memory as a model's layers do, not from the cache.
* **passes**: the verifier engine's pass over one session (context ``--context``) with 1 to 9
  rows, and a prefill, with the model's layers as loaded (MKL) and after
  ``common.cpu_linear.use_onednn_linears`` (what the engine and the torch draft run).

    PYTHONPATH=. python benchmarks/cpu_linear.py --models smollm2-135m-instruct bundled:target
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(576, 1536), (1536, 576), (576, 576), (576, 49152), (384, 1024), (128, 384)]
ROWS = [1, 2, 3, 5, 9, 32, 160]
PASS_ROWS = [1, 2, 3, 5, 9]


def median_ms(run: Callable[[], Any], reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def each(product: Callable[..., torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for weight in weights:
        product(x, weight, None)


def product_rows(megabytes: int, reps: int) -> list[dict[str, Any]]:
    from common.cpu_linear import _onednn

    rows = []
    for fan_in, fan_out in SHAPES:
        matrices = max(2, megabytes * 2**20 // (4 * fan_in * fan_out))
        weights = [torch.randn(fan_out, fan_in) for _ in range(matrices)]
        for count in ROWS:
            x = torch.randn(1, count, fan_in)
            mkl = median_ms(functools.partial(each, F.linear, x, weights), reps) / matrices
            onednn = median_ms(functools.partial(each, _onednn, x, weights), reps) / matrices
            rows.append({"in": fan_in, "out": fan_out, "rows": count, "mkl_ms": round(mkl, 4),
                         "onednn_ms": round(onednn, 4), "speedup": round(mkl / onednn, 2)})
            print(rows[-1], flush=True)
    return rows


def pass_ms(engine: Any, rows: int, context: int, reps: int) -> tuple[float, float]:
    """Median ms of a pass verifying ``rows - 1`` drafts after a ``context``-token prefill, and of
    that prefill."""
    from common.sampling import SamplingParams
    from verifier_worker.engine import Draft, VerifyRequest
    from verifier_worker.kv import SessionKV

    verify_times: list[float] = []
    prefill_times: list[float] = []
    for _ in range(reps):
        kv, tokens = SessionKV(), [3 + i % 1000 for i in range(context)]
        for drafted, times, ctx in ((0, prefill_times, tokens), (rows - 1, verify_times, [*tokens, 5])):
            draft = Draft.empty()
            draft.token_ids = np.asarray([7] * drafted, dtype=np.uint32)
            start = time.perf_counter()
            engine.verify([VerifyRequest(kv, ctx, draft, SamplingParams(), drafted)])
            times.append(time.perf_counter() - start)
        kv.clear()
    return statistics.median(verify_times) * 1e3, statistics.median(prefill_times) * 1e3


def use_kernel(model: Any, kernel: str) -> None:
    from common.cpu_linear import OneDNNLinear, use_onednn_linears

    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = torch.nn.Linear  # type: ignore[assignment]  # back to MKL's kernel
    if kernel == "onednn":
        use_onednn_linears(model)


def pass_rows(name: str, context: int, reps: int, rounds: int) -> list[dict[str, Any]]:
    from common.models import load_causal_lm
    from verifier_worker.engine import TargetEngine

    loaded = load_causal_lm(name)
    engine = TargetEngine(loaded.model, loaded.vocab_size, 8192)  # switches to oneDNN itself
    out = []
    for round_ in range(rounds):
        for kernel in ("mkl", "onednn") if round_ % 2 == 0 else ("onednn", "mkl"):
            use_kernel(loaded.model, kernel)
            engine.warm_up()
            for rows in PASS_ROWS:
                verify, prefill = pass_ms(engine, rows, context, reps)
                out.append({"model": name, "kernel": kernel, "round": round_, "rows": rows,
                            "pass_ms": round(verify, 2), "prefill_ms": round(prefill, 1)})
                print(out[-1], flush=True)
    return out


def summary(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for name in dict.fromkeys(p["model"] for p in passes):
        for rows in PASS_ROWS:
            got = {k: statistics.median(p["pass_ms"] for p in passes
                                        if p["model"] == name and p["rows"] == rows and p["kernel"] == k)
                   for k in ("mkl", "onednn")}
            table.append({"model": name, "rows": rows, **{f"{k}_ms": round(v, 2) for k, v in got.items()},
                          "speedup": round(got["mkl"] / got["onednn"], 2)})
        prefill = {k: statistics.median(p["prefill_ms"] for p in passes
                                        if p["model"] == name and p["kernel"] == k)
                   for k in ("mkl", "onednn")}
        table.append({"model": name, "rows": "prefill",
                      **{f"{k}_ms": round(v, 1) for k, v in prefill.items()},
                      "speedup": round(prefill["mkl"] / prefill["onednn"], 2)})
    return table


def markdown(args: argparse.Namespace, products: list[dict[str, Any]], table: list[dict[str, Any]]) -> str:
    lines = ["# CPU linear kernels: MKL (torch's default) against oneDNN", "",
             f"`{vars(args)}`; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             "one thread.", "", "## One product (ms per weight, weights streamed from memory)", "",
             "| in | out | rows | MKL ms | oneDNN ms | MKL / oneDNN |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['in']} | {r['out']} | {r['rows']} | {r['mkl_ms']} | {r['onednn_ms']} | {r['speedup']} |"
              for r in products]
    lines += ["", f"## One verifier pass, one session, context {args.context} (medians over rounds)", "",
              "| model | rows | MKL ms | oneDNN (as used) ms | MKL / oneDNN |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['rows']} | {r['mkl_ms']} | {r['onednn_ms']} | {r['speedup']} |"
              for r in table]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["smollm2-135m-instruct", "bundled:target"])
    parser.add_argument("--megabytes", type=int, default=96,
                        help="weights per product timing (several times the L3 cache, as a model's)")
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two kernels per model")
    parser.add_argument("--tag", default="cpu_linear")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with torch.inference_mode():
        products = product_rows(args.megabytes, args.reps)
    passes = [row for name in args.models for row in pass_rows(name, args.context, args.reps, args.rounds)]
    table = summary(passes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"args": vars(args), "products": products, "passes": passes, "summary": table}, indent=1))
    (RESULTS / f"{args.tag}.md").write_text(markdown(args, products, table))
    print(markdown(args, products, table))


if __name__ == "__main__":
    main()
