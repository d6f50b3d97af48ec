"""Attention read in place against the gathered batch, on one device: exactness, then pass time.

1. **Check** (float32, TF32 off): sessions of context 2,048 whose blocks are consecutive, one
   short session and one whose blocks interleave with another's, verified in one pass with
   in-place attention (``IN_PLACE_CONTEXT`` 512) and with every row gathered (``IN_PLACE_CONTEXT``
   huge); both against the plain model's forward over each full context. Max absolute logit
   differences are reported; the check fails beyond ``--atol``.
2. **Time** (Llama-3.1-8B's shape with ``--layers`` layers, random bf16 weights, vocabulary
   128,256, gamma 4): at ``--context`` and each batch, the median ``verify()`` and its forward,
   in place and gathered, side by side in this one process, and the plain model forward of the
   same tokens on a rectangular ``DynamicCache`` (no paging at all).

    PYTHONPATH=. python benchmarks/gpu_in_place.py              # a CUDA GPU
    PYTHONPATH=. python benchmarks/gpu_in_place.py --cpu --out benchmarks/results/cpu_in_place.json
    PYTHONPATH=. python benchmarks/gpu_in_place.py --cpu-smoke  # the script itself, small, on a CPU

Results: ``benchmarks/results/gpu_in_place.json`` (or ``--out``).
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

from engine_pass import LOGIT_STD, make_draft

RESULTS = Path(__file__).resolve().parent / "results"
HUGE = 10**9


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def llama(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int,
          dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.inference_mode():
        std = model(torch.randint(0, vocab, (1, 32), device=device)).logits.float().std()
        model.lm_head.weight.mul_(LOGIT_STD / float(std))
    return model


def check(device: torch.device, context: int, atol: float) -> dict[str, Any]:
    """In place and gathered against the plain model, float32."""
    import verifier_worker.engine as engine_mod
    from common.sampling import SamplingParams
    from verifier_worker.kv import SessionKV

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    vocab = 4096
    model = llama(vocab, 512, 4, 8, 2, 1024, torch.float32, device)
    rng = np.random.default_rng(0)
    lengths = [context] * 4 + [40, context - 100, context - 7]
    contexts = [rng.integers(2, vocab, n).tolist() for n in lengths]
    out: dict[str, Any] = {}
    for label, threshold in (("in_place", 512), ("gathered", HUGE)):
        engine_mod.IN_PLACE_CONTEXT = threshold
        engine = engine_mod.TargetEngine(model, vocab, kv_budget_tokens=len(lengths) * (context + 64))
        kvs = [SessionKV() for _ in contexts]
        for end in range(16, context + 16, 16):  # the last two interleave: not consecutive
            for kv, ctx in zip(kvs[-2:], contexts[-2:], strict=True):
                if end <= len(ctx) - 3:
                    engine.arena.allocate(kv, end)
        with torch.inference_mode():
            for kv, ctx in zip(kvs, contexts, strict=True):  # prefill one by one
                engine._forward([engine_mod.VerifyRequest(kv, ctx[:-3], engine_mod.Draft.empty(),
                                                          SamplingParams(), 0)])
                kv.truncate(kv.length - 1)
            step = []
            for kv, ctx in zip(kvs, contexts, strict=True):
                draft = engine_mod.Draft.empty()
                draft.token_ids = np.asarray(ctx[-2:], dtype=np.uint32)
                step.append(engine_mod.VerifyRequest(kv, ctx[:-2], draft, SamplingParams(), 1))
            logits = engine._forward(step).float()
            diffs = []
            for i, ctx in enumerate(contexts):
                plain = model(torch.tensor([ctx], device=device)).logits[0, -3:].float()
                diffs.append(float((logits[3 * i:3 * i + 3] - plain).abs().max()))
        out[label] = {"max_abs_diff_per_session": [round(d, 6) for d in diffs]}
        for kv in kvs:
            kv.clear()
    engine_mod.IN_PLACE_CONTEXT = 512
    worst = max(max(v["max_abs_diff_per_session"]) for v in out.values())
    out.update(lengths=lengths, atol=atol, ok=worst <= atol)
    return out


def timing(device: torch.device, args: argparse.Namespace) -> list[dict[str, Any]]:
    import verifier_worker.engine as engine_mod
    from verifier_worker.kv import SessionKV

    small = args.cpu_smoke
    vocab = 4096 if small else 128256
    if args.cpu:  # engine_pass.py's real-scale shape: hidden 256, 8 layers, fp32
        model = llama(vocab, 256, 8, 4, 2, 512, torch.float32, device)
    elif small:
        model = llama(vocab, 256, 2, 4, 2, 512, torch.float32, device)
    else:
        model = llama(vocab, 4096, args.layers, 32, 8, 14336, torch.bfloat16, device)
    batches = [int(b) for b in args.batches.split(",")]
    engine = engine_mod.TargetEngine(model, vocab, kv_budget_tokens=max(batches) * (args.context + 64) + 64)
    for tensor in [*engine.arena.keys, *engine.arena.values]:
        tensor.normal_()
    spans: list[float] = []
    started: list[float] = []

    def pre(*_: Any) -> None:
        sync()
        started.append(time.perf_counter())

    def post(*_: Any) -> None:
        sync()
        spans.append(time.perf_counter() - started[-1])

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        kvs = [SessionKV() for _ in range(batch)]
        for kv in kvs:
            engine.arena.allocate(kv, args.context + 64)
            kv.length = args.context - 1
        contexts = [rng.integers(2, vocab, args.context).tolist() for _ in range(batch)]
        row: dict[str, Any] = {"batch": batch, "context": args.context, "gamma": args.gamma}
        for label, threshold in (("in_place", 512), ("gathered", HUGE)) * 2:  # alternated twice
            engine_mod.IN_PLACE_CONTEXT = threshold
            del spans[:]
            verify_ms = time_passes(engine, kvs, contexts, rng, vocab, args)
            row.setdefault(f"{label}_verify_ms", []).append(verify_ms)
            row.setdefault(f"{label}_forward_ms", []).append(round(statistics.median(spans[1:]) * 1e3, 2))
        engine_mod.IN_PLACE_CONTEXT = 512
        row["plain_forward_ms"] = round(plain_forward(model, batch, args.context, args.gamma, args.passes), 2)
        model.set_attn_implementation(engine_mod.SLOT_ATTENTION)
        best = {k: min(v) for k, v in row.items() if isinstance(v, list)}
        row["in_place_forward_over_plain"] = round(
            best["in_place_forward_ms"] / row["plain_forward_ms"], 3)
        row["in_place_over_gathered_verify"] = round(
            best["in_place_verify_ms"] / best["gathered_verify_ms"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        for kv in kvs:
            kv.clear()
    return rows


def time_passes(engine: Any, kvs: list[Any], contexts: list[list[int]], rng: np.random.Generator,
                vocab: int, args: argparse.Namespace) -> float:
    """Median verify() ms over ``args.passes`` passes after one warm-up, caches rolled back each."""
    import verifier_worker.engine as engine_mod
    from common.sampling import SamplingParams

    totals = []
    for seq in range(args.passes + 1):
        for kv in kvs:
            kv.truncate(args.context - 1)
        requests = [engine_mod.VerifyRequest(kv, ctx, make_draft(engine_mod, rng, vocab, args.gamma, False),
                                             SamplingParams(), seq)
                    for kv, ctx in zip(kvs, contexts, strict=True)]
        sync()
        begin = time.perf_counter()
        engine.verify(requests)
        sync()
        totals.append(time.perf_counter() - begin)
    return round(statistics.median(totals[1:]) * 1e3, 2)


def plain_forward(model: Any, batch: int, context: int, gamma: int, passes: int) -> float:
    """The plain model forward of the same tokens on a rectangular DynamicCache (sdpa), ms."""
    from transformers import DynamicCache

    config, device, dtype = model.config, model.device, model.dtype
    kv_heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(batch, kv_heads, context - 1, dim, device=device, dtype=dtype),
                     torch.randn(batch, kv_heads, context - 1, dim, device=device, dtype=dtype), layer)
    ids = torch.randint(2, config.vocab_size, (batch, gamma + 1), device=device)
    positions = torch.arange(context - 1, context + gamma, device=device)[None].expand(batch, -1)
    times = []
    with torch.inference_mode():
        for _ in range(passes + 1):
            sync()
            begin = time.perf_counter()
            model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                  logits_to_keep=gamma + 1)
            sync()
            times.append(time.perf_counter() - begin)
            excess = cache.get_seq_length() - (context - 1)
            cache.crop(-excess)  # negative: tokens to drop (every transformers version)
    return statistics.median(times[1:]) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--atol", type=float, default=2e-3)
    parser.add_argument("--out", default=str(RESULTS / "gpu_in_place.json"))
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--cpu", action="store_true",
                        help="time on the CPU (one thread) with engine_pass.py's shape")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not (args.cpu_smoke or args.cpu):
        print("gpu_in_place: no CUDA device here (or --cpu-smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__}
    report["check"] = check(device, 600 if args.cpu_smoke else args.context, args.atol)
    print(json.dumps(report["check"]), flush=True)
    report["timing"] = timing(device, args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
