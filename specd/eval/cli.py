"""``specd eval``: its flags (``add_parser``) and its entry point (``run``).

Exit status: 0 every question succeeded; 1 some questions failed (their records say why);
2 bad input or usage (unreadable data, unknown category, output exists without --resume or
--overwrite, a quality library or matplotlib missing); 130 interrupted by SIGINT/SIGTERM (the
records written so far are kept: continue with --resume).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from common.settings import Settings
from specd.signals import on_stop_signals

DESCRIPTION = (
    "Run an evaluation suite through target-only, draft-only and speculative generation (the "
    "embedded Redis and verifier, or the pool at --redis-url), write one JSONL record per question "
    "and a summary: speed, acceptance, speedup, exact match and quality (BLEU, ROUGE, pass@1) per "
    "category and mode. See docs/eval.md.")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive integers, e.g. 2,4,6")
    return values


def _modes(text: str) -> list[str]:
    from specd.eval.records import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {unknown or text!r}: choose from {','.join(MODES)}")
    return modes


def default_modes(settings: Any) -> tuple[str, ...]:
    """Every mode, less draft-only for a feature draft (it drafts only from the target's features;
    the standalone draft's figures: ``--modes draft --draft-model smollm2-135m-draft``)."""
    from common.feature_draft import feature_draft_folder
    from specd.eval.records import MODES

    if feature_draft_folder(settings.models.draft) is None:
        return MODES
    print(f"specd eval: {settings.models.draft} is a feature draft: no draft-only mode "
          "(--modes draft --draft-model smollm2-135m-draft gives the standalone draft's)", file=sys.stderr)
    return tuple(m for m in MODES if m != "draft")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    from specd.eval.suites import SUITES
    from specd.failures import EPILOG
    from specd.flags import HelpFormatter, add_setting_flags

    parser = commands.add_parser("eval", help="run an evaluation suite (Spec-Bench, WMT, CNN/DM, HumanEval)",
                                 description=DESCRIPTION, formatter_class=HelpFormatter, epilog=EPILOG)
    parser.add_argument("--suite", required=True, choices=SUITES)
    parser.add_argument("--data", required=True, type=Path, help="the suite's data file")
    parser.add_argument("--field", default="text", help="--suite jsonl: the field holding the prompt")
    parser.add_argument("--out", type=Path, help="output folder for records.jsonl and summary.json "
                        "(default specd-eval/SUITE)")
    parser.add_argument("--modes", type=_modes, default=None,
                        help="comma-separated subset of target,draft,speculative (default all)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="questions in flight at once (speculative sessions batched by the verifier)")
    parser.add_argument("--max-examples", type=int, default=0, help="only the first N questions")
    parser.add_argument("--sample", type=int, default=0, help="a seeded sample of N questions (--seed)")
    parser.add_argument("--categories", help="comma-separated categories to keep")
    parser.add_argument("--resume", action="store_true",
                        help="skip questions already recorded; failed ones (error records) run again")
    parser.add_argument("--overwrite", action="store_true", help="start the records file again")
    parser.add_argument("--rescore", action="store_true",
                        help="HumanEval: run the recorded completions' tests again (after a harness "
                             "change) and rebuild the summary; nothing is generated")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts here")
    parser.add_argument("--exec-timeout", type=float, default=5.0,
                        help="HumanEval: seconds each completion's tests may run (default 5)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON, not a table")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    add_setting_flags(parser, "common", "target", "batching", "draft")
    parser.set_defaults(handler=run, log_level="warning")  # a log line per session would drown the table
    for action in parser._actions:  # --gamma here takes a list: 2,4,6 is an ablation
        if "--gamma" in action.option_strings:
            action.dest, action.type = "gammas", _int_list
            action.help = "draft tokens per round; a comma-separated list runs a gamma ablation"
    return parser


def _fail(message: str) -> int:
    print(f"specd eval: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, settings: Settings) -> int:
    from specd.eval.records import MODES, RecordFile
    from specd.eval.runner import EvalOptions
    from specd.eval.suites import SuiteError, read_suite, select
    from specd.runtime import draft_gamma

    try:
        questions = read_suite(args.suite, args.data, args.field)
    except SuiteError as exc:
        return _fail(str(exc))
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    unknown = sorted(set(categories or []) - {q.category for q in questions})
    if unknown:
        return _fail(f"no question has category {', '.join(unknown)}; the file has "
                     f"{', '.join(sorted({q.category for q in questions}))}")
    selected = select(questions, categories, args.sample, settings.sampling.seed or 0, args.max_examples)
    options = EvalOptions(
        suite=args.suite, out_dir=args.out or Path("specd-eval") / args.suite,
        modes=tuple(m for m in MODES if m in (args.modes or default_modes(settings))),
        gammas=tuple(args.gammas or [draft_gamma(settings)]), concurrency=max(1, args.concurrency),
        resume=args.resume, progress=args.progress, exec_timeout_s=args.exec_timeout)
    records = RecordFile(options.records_path)
    if args.rescore:
        return _rescore(options, selected, records, args)
    if records.path.exists() and records.path.stat().st_size and not (args.resume or args.overwrite):
        return _fail(f"{records.path} already holds records: --resume to continue that run, "
                     "--overwrite to start again, or another --out")
    settings.edge.max_concurrent_sessions = max(settings.edge.max_concurrent_sessions, options.concurrency)
    problem = _unmet_needs(settings, options, args)
    if problem:
        return _fail(problem)
    return _evaluate(settings, options, selected, records, args)


def _rescore(options: Any, selected: list[Any], records: Any, args: argparse.Namespace) -> int:
    """--rescore: the recorded completions checked again by today's harness; the earlier run's
    timings are kept in the summary."""
    from specd.eval.runner import check_blocks
    from specd.eval.summary import summarize

    if options.suite != "humaneval":
        return _fail("--rescore re-runs HumanEval's tests; the other suites' scores are computed "
                     "from the records whenever a summary is built (--resume rebuilds it)")
    saved = records.read()
    if not saved:
        return _fail(f"{records.path} holds no records to rescore: run the suite first")
    by_id = {str(q.question_id): q for q in selected}
    answers = [(by_id[str(r["question_id"])], r) for r in saved
               if "error" not in r and str(r["question_id"]) in by_id]
    check_blocks(answers, options.exec_timeout_s, options.exec_workers)
    records.rewrite(saved)
    run_info: dict[str, Any] = {}
    if options.summary_path.exists():
        run_info = json.loads(options.summary_path.read_text()).get("run") or {}
    summary = summarize(saved, options.suite, len(selected), {**run_info, "rescored": len(answers)})
    _write_summary(summary, options, args, f"{records.path} ({len(answers)} rescored)")
    return 0


def _write_summary(summary: dict[str, Any], options: Any, args: argparse.Namespace, records: str) -> None:
    """summary.json, and the summary on stdout: JSON with --json, else the table and the paths."""
    from specd.eval.summary import print_table

    options.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary, sys.stdout)
        print(f"records: {records}\nsummary: {options.summary_path}")


def _unmet_needs(settings: Settings, options: Any, args: argparse.Namespace) -> str:
    """What would only fail after the whole suite ran (or a model loaded): found now."""
    from common.models import ModelLoadError
    from specd.eval.plots import check_plotting
    from specd.runtime import check_models

    try:
        speculative_here = "speculative" in options.modes and not settings.redis.url  # embedded verifier
        check_models(settings, target="target" in options.modes or speculative_here,
                     draft=bool({"draft", "speculative"} & set(options.modes)))
        if args.plot:
            check_plotting()
    except (ModelLoadError, RuntimeError) as exc:
        return str(exc)
    return ""


def _evaluate(settings: Settings, options: Any, selected: list[Any], records: Any,
              args: argparse.Namespace) -> int:
    from specd.eval.progress import Progress
    from specd.eval.quality import QualityUnavailableError
    from specd.eval.summary import summarize

    records.start(options.resume)
    done = records.done_ids() if options.resume else set()
    pending = [(i, q) for i, q in enumerate(selected) if q.question_id not in done]
    progress = Progress(len(pending), options.progress)
    started = time.perf_counter()
    info, interrupted = asyncio.run(_run_async(settings, options, pending, records, progress))
    progress.close()
    info = {**info, "wall_s": round(time.perf_counter() - started, 3)}
    if options.resume and options.summary_path.exists():  # keep the timings of the earlier runs
        info["earlier_runs"] = _earlier_runs(options.summary_path)
        info.update(_all_runs([*info["earlier_runs"], info]))
    if interrupted:
        print(f"specd eval: interrupted; {len(records.done_ids())} records in {records.path} "
              "(continue with --resume)", file=sys.stderr)
        return 130
    try:
        summary = summarize(records.read(), options.suite, len(selected), info)
    except QualityUnavailableError as exc:
        return _fail(str(exc))
    _write_summary(summary, options, args, str(records.path))
    if args.plot:
        rc = _plot(summary, args.plot)
        if rc:
            return rc
    return 0 if summary["counts"]["failed"] == 0 else 1


def _earlier_runs(path: Path) -> list[dict[str, Any]]:
    try:
        run = json.loads(path.read_text()).get("run") or {}
    except (OSError, ValueError):
        return []
    earlier = run.pop("earlier_runs", [])
    return [*earlier, run] if run else earlier


def _all_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase time and tokens summed over a run and the runs it resumed, and their throughput ratio."""
    phases: dict[str, dict[str, float]] = {}
    for run in runs:
        for name, phase in (run.get("phases") or {}).items():
            total = phases.setdefault(name, {"wall_s": 0.0, "tokens": 0})
            total["wall_s"] += phase["wall_s"]
            total["tokens"] += phase["tokens"]
    rate = {name: p["tokens"] / p["wall_s"] for name, p in phases.items() if p["wall_s"]}
    return {"phases_all_runs": phases, "throughput_speedup_all_runs": {
        name: round(r / rate["target"], 4) for name, r in rate.items()
        if name.startswith("speculative") and rate.get("target")}}


def _plot(summary: dict[str, Any], folder: Path) -> int:
    from specd.eval.plots import write_charts

    try:
        paths = write_charts(summary, folder)
    except RuntimeError as exc:
        return _fail(str(exc))
    print("charts: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


async def _run_async(settings: Settings, options: Any, pending: list[Any], records: Any,
                     progress: Any) -> tuple[dict[str, Any], bool]:
    """Run the questions; SIGINT/SIGTERM cancel the run cleanly (embedded Redis and verifier closed)."""
    from specd.eval.runner import EvalRun, open_models

    if not pending:  # a resumed run that is already complete: only the summary is rebuilt
        return {"resumed_skipping": len(records.done_ids())}, False
    task = asyncio.current_task()
    assert task is not None
    remove_handlers = on_stop_signals(lambda _signum: task.cancel())
    run = None
    try:
        async with open_models(settings, options) as models:
            run = EvalRun(settings, options, models, records, progress)
            await run.run(pending)
    except asyncio.CancelledError:
        return {}, True
    finally:
        remove_handlers()
    return run.run_info(0.0, len(records.done_ids()) - progress.done), False
