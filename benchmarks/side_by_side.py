"""specd beside Hugging Face transformers on one user's prompts, same pair, same tokens.

Systems, each greedy, each with one torch thread, each on the same prompts (the first
``--prompts`` HumanEval prompts) with the same stop rule (the target's end-of-sequence ids) and
the same ``--max-new-tokens``:

  * ``hf_generate``: transformers' plain ``generate`` on the target (its own KV cache);
  * ``hf_assisted``: transformers' assisted generation with ``--hf-draft`` (default ``--draft``),
    ``num_assistant_tokens`` fixed at ``--gamma`` (constant schedule) and its confidence cut at
    ``--confidence`` (specd's ``edge.draft_confidence`` gets the same). transformers takes only a
    standalone draft model: with a feature draft as ``--draft``, give the standalone one here;
  * ``specd_target``: ``specd generate --mode target``'s path (``generate_target_only`` on the
    verifier's engine);
  * ``specd_speculative``: ``specd generate``'s path: an embedded Redis, the verifier running in
    this process, the edge drafting with the torch backend, gamma ``--gamma``;
  * ``specd_speculative_ahead``: the same with ``edge.draft_ahead`` on (``--ahead``);
  * ``specd_speculative_o<bar>`` (``--also-open``): the same with another first-token bar
    (``edge.draft_open_confidence``; ``specd_speculative`` uses the draft's recommendation, 0.5
    for the shipped SmolLM2 draft): with 0 every round drafts, as transformers' always does;
  * ``specd_speculative_same``: when ``--hf-draft`` differs, specd drafting with it too (the
    very pair transformers runs);
  * ``hf_lookup`` and ``specd_lookup_draft`` (``--lookup``): transformers' prompt-lookup decoding
    (``prompt_lookup_num_tokens`` = ``--gamma``: n-grams of the prompt as the draft, no draft
    model) beside specd's prompt lookup with the draft model filling in where no n-gram matches
    (``edge.backend = "prompt_lookup"``, ``edge.lookup_with_model``), a combination
    transformers' ``generate`` does not offer (it takes an assistant model or prompt lookup);
  * ``specd_split`` and ``specd_split_ahead`` (``--split``): the verifier in a process of its
    own (``specd verifier``, one torch thread), as in a deployment where the edge and the
    verifier are different machines: the edge's drafting ahead no longer shares a process (and
    its interpreter lock) with the target's pass;
  * ``hf_generate_onednn`` and ``hf_assisted_onednn`` (``--hf-onednn``): transformers' two
    systems with the CPU linear kernel specd's engine and torch draft use
    (``common/cpu_linear.py``), so the comparison holds the kernels equal and shows what is
    specd's beyond them.

``--chat`` wraps each prompt in the target's chat template (an instruct model's use).

Two settings, both reported run by run:

  * **warm**: one process holds every system (each its own copy of the models), runs each once as
    a warm-up, then ``--reps`` repetitions in rotating order; a system's rate in a repetition is
    its tokens over its wall time across all prompts;
  * **fresh** (``--fresh-reps`` > 0): one new process per prompt and system, as a user runs it:
    ``specd generate --json`` (its ``tokens_per_s``: the time from the first pass to the last
    token, model loading excluded) and, for transformers, a child process of this script timing
    its one ``generate`` call the same way.

Token ids are compared across systems (greedy: they must be identical). Ratios are what to quote
on a shared machine; every run is in the JSON. Results: ``benchmarks/results/side_by_side*.json``
and ``.md``. Examples:

    PYTHONPATH=. python benchmarks/side_by_side.py                      # bundled pair
    PYTHONPATH=. python benchmarks/side_by_side.py --target smollm2-135m-instruct \\
        --draft runs/feature/draft --hf-draft smollm2-135m-draft --chat --no-ahead --tag real
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.json"
ROOT = Path(__file__).resolve().parents[1]


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    from common.models import encode_prompt as encode

    return encode(tokenizer, text, chat)


def load_prompts(path: Path, count: int) -> list[str]:
    rows = json.loads(path.read_text()) if path.suffix == ".json" else [
        json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row.get("prompt") or row.get("text") or row["turns"][0] for row in rows[:count]]


# ---------------------------------------------------------------- transformers


def hf_model(name: str) -> Any:
    from common.models import load_causal_lm

    return load_causal_lm(name)


def hf_runner(target: Any, draft: Any | None, gamma: int, max_new: int,
              confidence: float = 0.0, lookup: bool = False) -> Callable[[list[int]], list[int]]:
    """One prompt through ``generate`` (plain, assisted when ``draft`` is given, or prompt lookup)."""
    kwargs: dict[str, Any] = {"prompt_lookup_num_tokens": gamma} if lookup else {}
    if draft is not None:
        draft.model.generation_config.num_assistant_tokens = gamma
        draft.model.generation_config.num_assistant_tokens_schedule = "constant"
        draft.model.generation_config.assistant_confidence_threshold = confidence
        kwargs["assistant_model"] = draft.model
    eos = sorted(target.eos_token_ids)

    @torch.inference_mode()
    def run(ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        out = target.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                    max_new_tokens=max_new, eos_token_id=eos,
                                    pad_token_id=target.tokenizer.pad_token_id or eos[0], **kwargs)
        return out[0, len(ids):].tolist()

    return run


# ---------------------------------------------------------------- specd


def settings_for(args: argparse.Namespace, ahead: bool = False, draft: str = "",
                 confidence: float | None = None, lookup: bool = False,
                 open_bar: float | None = None) -> Any:
    """``open_bar`` None: ``edge.draft_open_confidence`` unset, so the draft's recommendation."""
    from common.settings import Settings

    cut = args.confidence if confidence is None else confidence
    backend = {"backend": "prompt_lookup", "lookup_with_model": True} if lookup else {}
    bar = {} if open_bar is None else {"draft_open_confidence": open_bar}
    return Settings(models={"target": args.target, "draft": draft or args.draft, "torch_threads": 1},
                    edge={"gamma": args.gamma, "draft_ahead": ahead, "draft_confidence": cut, **backend,
                          **bar},
                    sampling={"temperature": 0.0, "max_new_tokens": args.max_new_tokens, "seed": 0},
                    log={"level": "warning"})


def specd_target_runner(args: argparse.Namespace) -> Callable[[list[int]], list[int]]:
    from common.models import load_causal_lm
    from common.sampling import SamplingParams
    from verifier_worker.engine import TargetEngine, generate_target_only

    target = load_causal_lm(args.target)
    engine = TargetEngine(target.model, target.vocab_size)
    engine.warm_up(gamma=0)
    return lambda ids: generate_target_only(engine, ids, SamplingParams(), target.eos_token_ids,
                                            args.max_new_tokens)


class SpecdStack:
    """``specd generate``'s speculative path kept open: embedded Redis, in-process verifier, edge."""

    def __init__(self, args: argparse.Namespace, ahead: bool, draft: str = "",
                 confidence: float | None = None, split: bool = False, lookup: bool = False,
                 open_bar: float | None = None) -> None:
        self.settings = settings_for(args, ahead, draft, confidence, lookup, open_bar)
        self.split = split  # the verifier in a process of its own
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()
        self.client: Any = None
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        from specd.generation import local_verifier, redis_url_for
        from specd.runtime import build_edge, open_broker

        url, _ = await self.stack.enter_async_context(redis_url_for(self.settings))
        if self.split:
            await self._verifier_process(url)
        else:
            await self.stack.enter_async_context(local_verifier(self.settings, url))
        broker = await open_broker(self.settings, url)
        self.stack.push_async_callback(broker.close)
        self.client = build_edge(self.settings, broker)

    async def _verifier_process(self, url: str) -> None:
        import tempfile

        from common.procs import child_env
        from specd.loadtest import VerifierPool

        # These settings (target, verdict secret, gamma for the warm-up, one thread), as loadtest's.
        env = child_env(self.settings, url)
        pool = VerifierPool(env, 1, Path(tempfile.mkdtemp(prefix="side-by-side-verifier-")))
        self.stack.push_async_callback(pool.stop)
        await pool.start(self.settings, url, 600)

    def __call__(self, ids: list[int]) -> list[int]:
        from specd.workers import sampling_spec

        spec = sampling_spec(self.settings, self.client.backend.eos_token_ids)
        return self.loop.run_until_complete(self.client.generate(ids, spec)).token_ids

    def close(self) -> None:
        self.loop.run_until_complete(self.stack.aclose())
        left = asyncio.all_tasks(self.loop)  # background loops still winding down
        for task in left:
            task.cancel()

        async def finished() -> None:
            await asyncio.gather(*left, return_exceptions=True)

        self.loop.run_until_complete(finished())
        self.loop.close()


# ---------------------------------------------------------------- warm: one process


def timed(run: Callable[[list[int]], list[int]], prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    outputs, started = [], time.perf_counter()
    for ids in prompts:
        outputs.append(run(ids))
    wall = time.perf_counter() - started
    return sum(len(o) for o in outputs) / wall, outputs


def add_variants(args: argparse.Namespace, runners: dict[str, Callable[[list[int]], list[int]]],
                 stacks: list[SpecdStack]) -> None:
    """specd speculative again with another confidence cut or first-token bar (0: always draft);
    with ``--hf-onednn``, transformers' two systems again with specd's CPU linear kernel."""
    if args.hf_onednn:
        from common.cpu_linear import use_onednn_linears

        target, draft = hf_model(args.target), hf_model(args.hf_draft)
        use_onednn_linears(target.model)
        use_onednn_linears(draft.model)
        runners["hf_generate_onednn"] = hf_runner(target, None, args.gamma, args.max_new_tokens)
        assisted = hf_model(args.target)
        use_onednn_linears(assisted.model)
        runners["hf_assisted_onednn"] = hf_runner(assisted, draft, args.gamma, args.max_new_tokens,
                                                  args.confidence)
    for cut in args.also_confidence:
        stacks.append(SpecdStack(args, ahead=False, confidence=cut))
        runners[f"specd_speculative_c{cut:g}"] = stacks[-1]
    for bar in args.also_open:
        stacks.append(SpecdStack(args, ahead=False, open_bar=bar))
        runners[f"specd_speculative_o{bar:g}"] = stacks[-1]


def warm(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    from common.models import load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.target)
    prompts = [encode_prompt(tokenizer, t, args.chat) for t in texts]
    target, draft = hf_model(args.target), hf_model(args.hf_draft)
    runners: dict[str, Callable[[list[int]], list[int]]] = {
        "hf_generate": hf_runner(target, None, args.gamma, args.max_new_tokens),
        "hf_assisted": hf_runner(hf_model(args.target), draft, args.gamma, args.max_new_tokens,
                                 args.confidence),
        "specd_target": specd_target_runner(args),
    }
    stacks = [SpecdStack(args, ahead=False)]
    runners["specd_speculative"] = stacks[0]
    if args.ahead:
        stacks.append(SpecdStack(args, ahead=True))
        runners["specd_speculative_ahead"] = stacks[-1]
    if args.hf_draft != args.draft:
        stacks.append(SpecdStack(args, ahead=False, draft=args.hf_draft))
        runners["specd_speculative_same"] = stacks[-1]
    if args.lookup:
        runners["hf_lookup"] = hf_runner(hf_model(args.target), None, args.gamma, args.max_new_tokens,
                                         lookup=True)
        stacks.append(SpecdStack(args, ahead=False, lookup=True))
        runners["specd_lookup_draft"] = stacks[-1]
    if args.split:
        stacks.append(SpecdStack(args, ahead=False, split=True))
        runners["specd_split"] = stacks[-1]
        stacks.append(SpecdStack(args, ahead=True, split=True))
        runners["specd_split_ahead"] = stacks[-1]
    add_variants(args, runners, stacks)
    try:
        names = list(runners)
        first = {name: round(timed(runners[name], prompts)[0], 2) for name in names}  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in names}
        outputs: dict[str, list[list[int]]] = {}
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            if rep % 2:
                order.reverse()
            for name in order:
                rate, outputs[name] = timed(runners[name], prompts)
                runs[name].append(round(rate, 2))
                print(f"warm rep {rep} {name}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for stack in stacks:
            stack.close()
    reference = outputs["hf_generate"]
    return {"first_pass_tok_s": first, "runs": runs,
            "median": {n: round(statistics.median(v), 2) for n, v in runs.items()},
            "tokens": sum(len(o) for o in reference),
            "identical_to_hf_generate": {n: o == reference for n, o in outputs.items()}}


# ---------------------------------------------------------------- fresh: one process per prompt


def hf_child(args: argparse.Namespace) -> None:
    """One prompt, plain or assisted, in this fresh process: prints its tokens and rate."""
    torch.set_num_threads(1)
    target = hf_model(args.target)
    draft = hf_model(args.hf_draft) if args.child == "hf_assisted" else None
    ids = encode_prompt(target.tokenizer, args.child_prompt, args.chat)
    started = time.perf_counter()
    tokens = hf_runner(target, draft, args.gamma, args.max_new_tokens, args.confidence)(ids)
    wall = time.perf_counter() - started
    print(json.dumps({"token_ids": tokens, "tokens": len(tokens), "wall_ms": wall * 1000,
                      "tokens_per_s": len(tokens) / wall}))


def fresh_command(args: argparse.Namespace, system: str, prompt: str) -> list[str]:
    if system.startswith("hf_"):
        return [sys.executable, __file__, "--child", system, "--child-prompt", prompt,
                "--target", args.target, "--draft", args.draft, "--hf-draft", args.hf_draft,
                "--gamma", str(args.gamma), "--max-new-tokens", str(args.max_new_tokens),
                "--confidence", str(args.confidence), *(["--chat"] if args.chat else [])]
    mode = "target" if system == "specd_target" else "speculative"
    command = [sys.executable, "-m", "specd", "generate", "--json", "--prompt", prompt, "--mode", mode,
               "--target-model", args.target, "--draft-model", args.draft, "--torch-threads", "1",
               "--gamma", str(args.gamma), "--max-new-tokens", str(args.max_new_tokens),
               "--temperature", "0", "--seed", "0", "--log-level", "error",
               "--draft-confidence", str(args.confidence),
               *(["--chat"] if args.chat else [])]
    if system == "specd_speculative_ahead":
        command.append("--draft-ahead")
    elif mode == "speculative":
        command.append("--no-draft-ahead")
    return command


def fresh(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    systems = ["hf_generate", "hf_assisted", "specd_target", "specd_speculative"]
    if args.ahead:
        systems.append("specd_speculative_ahead")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for rep in range(args.fresh_reps):
        for index, prompt in enumerate(texts[:args.fresh_prompts]):
            order = systems[(rep + index) % len(systems):] + systems[:(rep + index) % len(systems)]
            for system in order:
                done = subprocess.run(fresh_command(args, system, prompt), env=env, cwd=ROOT,
                                      capture_output=True, text=True, timeout=900, check=False)
                if done.returncode:
                    raise RuntimeError(f"{system} failed: {done.stderr[-2000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[system].append({"rep": rep, "prompt": index, "tokens": result["tokens"],
                                     "wall_ms": round(float(result["wall_ms"]), 2),
                                     "token_ids": result["token_ids"]})
                print(f"fresh rep {rep} prompt {index} {system}: {result['tokens_per_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {}
    for system, rows in runs.items():  # per repetition: tokens over wall time across prompts
        rates[system] = [round(sum(r["tokens"] for r in rows if r["rep"] == rep) / sum(
            r["wall_ms"] for r in rows if r["rep"] == rep) * 1000, 2) for rep in range(args.fresh_reps)]
    reference = [r["token_ids"] for r in runs["hf_generate"]]
    return {"runs": {s: [{k: v for k, v in r.items() if k != "token_ids"} for r in rows]
                     for s, rows in runs.items()},
            "rates": rates, "median": {s: round(statistics.median(v), 2) for s, v in rates.items()},
            "identical_to_hf_generate": {s: [r["token_ids"] for r in rows] == reference
                                         for s, rows in runs.items()}}


# ---------------------------------------------------------------- report


def ratios(median: dict[str, float]) -> dict[str, float]:
    out = {"specd_target / hf_generate": median["specd_target"] / median["hf_generate"],
           "specd_speculative / hf_assisted": median["specd_speculative"] / median["hf_assisted"]}
    if "hf_generate_onednn" in median:
        out["specd_target / hf_generate_onednn"] = median["specd_target"] / median["hf_generate_onednn"]
        out["specd_speculative / hf_assisted_onednn"] = (median["specd_speculative"]
                                                         / median["hf_assisted_onednn"])
    for name in median:
        if name.startswith("specd_speculative_c"):
            out[f"{name} / hf_assisted"] = median[name] / median["hf_assisted"]
        if name.startswith("specd_speculative_o"):
            out[f"{name} / hf_assisted"] = median[name] / median["hf_assisted"]
            out[f"specd_speculative / {name}"] = median["specd_speculative"] / median[name]
    if "specd_speculative_same" in median:
        out["specd_speculative_same / hf_assisted"] = median["specd_speculative_same"] / median["hf_assisted"]
    if "specd_speculative_ahead" in median:
        ahead = median["specd_speculative_ahead"]
        out["specd_speculative_ahead / hf_assisted"] = ahead / median["hf_assisted"]
        out["ahead / no ahead"] = median["specd_speculative_ahead"] / median["specd_speculative"]
    if "specd_lookup_draft" in median:
        for other in ("hf_assisted", "hf_lookup", "specd_speculative"):
            out[f"specd_lookup_draft / {other}"] = median["specd_lookup_draft"] / median[other]
    if "specd_split" in median:
        out["specd_split / specd_speculative"] = median["specd_split"] / median["specd_speculative"]
        out["specd_split / hf_assisted"] = median["specd_split"] / median["hf_assisted"]
        out["split: ahead / no ahead"] = median["specd_split_ahead"] / median["specd_split"]
        out["specd_split_ahead / hf_assisted"] = median["specd_split_ahead"] / median["hf_assisted"]
    return {k: round(v, 3) for k, v in out.items()}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# side by side: {report['config']['target']} / {report['config']['draft']}", "",
             f"{report['config']}", ""]
    for setting in ("warm", "fresh"):
        part = report.get(setting)
        if not part:
            continue
        runs = part.get("runs") if setting == "warm" else part["rates"]
        lines += [f"## {setting}", "", "| system | median tok/s | runs | identical to hf_generate |",
                  "|---|---:|---|---|"]
        for name, median in part["median"].items():
            lines.append(f"| {name} | {median} | {runs[name]} | {part['identical_to_hf_generate'][name]} |")
        lines += ["", f"ratios: {part['ratios']}", ""]
    if "fresh_over_warm" in report:
        lines += [f"fresh / warm (specd): {report['fresh_over_warm']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="bundled:target")
    parser.add_argument("--draft", default="bundled:draft")
    parser.add_argument("--hf-draft", default="", help="transformers' assistant (default --draft)")
    parser.add_argument("--chat", action="store_true", help="prompts through the chat template")
    parser.add_argument("--prompts-file", type=Path, default=PROMPTS)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--confidence", type=float, default=0.0,
                        help="end drafting below this draft probability: specd's edge.draft_confidence "
                             "and transformers' assistant_confidence_threshold alike (0: off)")
    parser.add_argument("--also-confidence", type=float, nargs="*", default=[],
                        help="warm only: also run specd speculative with each of these cuts")
    parser.add_argument("--also-open", type=float, nargs="*", default=[],
                        help="warm only: also run specd speculative with each of these first-token "
                             "bars (edge.draft_open_confidence; 0: every round drafts)")
    parser.add_argument("--hf-onednn", action="store_true",
                        help="warm only: also run transformers' generate and assisted generation with "
                             "specd's CPU linear kernel (common/cpu_linear.py), kernels matched")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fresh-reps", type=int, default=1)
    parser.add_argument("--fresh-prompts", type=int, default=6)
    parser.add_argument("--ahead", action=argparse.BooleanOptionalAction, default=True,
                        help="also run speculative with edge.draft_ahead on")
    parser.add_argument("--lookup", action="store_true",
                        help="warm only: also run transformers' prompt lookup and specd's prompt lookup "
                             "beside the draft")
    parser.add_argument("--split", action="store_true",
                        help="warm only: also run specd with its verifier in a process of its own, "
                             "with and without drafting ahead")
    parser.add_argument("--tag", default="tiny")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-prompt", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.hf_draft = args.hf_draft or args.draft
    if args.child:
        hf_child(args)
        return
    from common.logs import configure_logging

    configure_logging("warning")
    texts = load_prompts(args.prompts_file, args.prompts)
    config = {k: v for k, v in vars(args).items() if not k.startswith("child")}
    config.update(prompts_file=str(args.prompts_file), machine=platform.machine(),
                  cpus=os.cpu_count(), torch=torch.__version__)
    report: dict[str, Any] = {"config": config, "warm": warm(args, texts)}
    report["warm"]["ratios"] = ratios(report["warm"]["median"])
    if args.fresh_reps:
        report["fresh"] = fresh(args, texts)
        report["fresh"]["ratios"] = ratios(report["fresh"]["median"])
        report["fresh_over_warm"] = {s: round(report["fresh"]["median"][s] / report["warm"]["median"][s], 3)
                                     for s in report["fresh"]["median"] if s.startswith("specd")}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"side_by_side_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
