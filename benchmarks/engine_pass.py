"""Cost of one verification pass of the target engine, by batch size and context length.

Each of ``B`` sessions holds a cached context of ``L`` tokens and sends a draft of ``gamma``
tokens; the pass verifies them all (greedy). Reported: median milliseconds per pass, per session,
and how many bytes of KV cache a pass would move if it gathered every session's cache into a
padded batch (what the engine did before it attended to arena views in place).

Runs on the installed engine, so the same command on an older checkout compares the two:

    PYTHONPATH=. python benchmarks/engine_pass.py --target-model bundled:target
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.models import load_causal_lm
from common.sampling import SamplingParams
from verifier_worker.engine import Draft, TargetEngine, VerifyRequest
from verifier_worker.kv import SessionKV

RESULTS = Path(__file__).resolve().parent / "results"


def make_request(kv: SessionKV, context: list[int], gamma: int, seq: int) -> VerifyRequest:
    ids = np.asarray(context[-gamma:] if gamma else [], dtype=np.uint32)
    draft = Draft(ids, np.zeros(0, np.uint16), np.zeros(0, np.uint32), np.zeros(0, np.float32))
    fields: dict[str, Any] = {"kv": kv, "context": context, "draft": draft,
                              "params": SamplingParams(), "seq": seq}
    if "reserve" in VerifyRequest.__dataclass_fields__:
        fields["reserve"] = len(context) + 64
    return VerifyRequest(**fields)


def time_passes(engine: TargetEngine, batch: int, context: int, gamma: int, passes: int,
                rng: np.random.Generator) -> float:
    """Median seconds per pass over ``passes`` passes after the prefill one."""
    contexts = [rng.integers(5, engine.vocab_size - 1, size=context).tolist() for _ in range(batch)]
    kvs = [SessionKV() for _ in range(batch)]
    engine.verify([make_request(kv, ctx, 0, 0) for kv, ctx in zip(kvs, contexts, strict=True)])
    times = []
    for seq in range(1, passes + 1):
        for kv, ctx in zip(kvs, contexts, strict=True):
            kv.truncate(len(ctx) - 1)  # every pass re-feeds the last token plus the draft
        requests = [make_request(kv, ctx, gamma, seq) for kv, ctx in zip(kvs, contexts, strict=True)]
        started = time.perf_counter()
        engine.verify(requests)
        times.append(time.perf_counter() - started)
    for kv in kvs:
        kv.clear()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-model", default="bundled:target")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="128,512")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--label", default="current")
    parser.add_argument("--out", default=str(RESULTS / "engine_pass.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target = load_causal_lm(args.target_model)
    engine = TargetEngine(target.model, target.vocab_size)
    config = target.model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * 4
    rng = np.random.default_rng(0)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            seconds = time_passes(engine, batch, context, args.gamma, args.passes, rng)
            rows.append({"batch": batch, "context": context, "gamma": args.gamma,
                         "pass_ms": round(seconds * 1e3, 2),
                         "ms_per_session": round(seconds * 1e3 / batch, 3),
                         "gathered_kv_mb_if_padded": round(batch * context * bytes_per_token / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
    report = {"label": args.label, "model": args.target_model, "rows": rows,
              "machine": f"{platform.machine()} CPU, 1 torch thread, torch {torch.__version__}"}
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[args.label] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
