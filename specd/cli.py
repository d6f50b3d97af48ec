"""The ``specd`` command line: demo, verifier, edge, generate, pool, devices, loadtest, pair tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from common.logs import LogSink, configure_logging
from common.settings import ConfigError, Settings, load_settings
from edge_worker.devices import BackendUnavailableError, DeviceUnavailableError
from specd.eval import cli as eval_cli
from specd.prompts import read_prompts

# Each flag maps to (section, key) of the settings; None values mean "not given".
FLAG_TO_SETTING = {
    "redis_url": ("redis", "url"),
    "target_model": ("models", "target"),
    "draft_model": ("models", "draft"),
    "dtype": ("models", "dtype"),
    "target_device": ("models", "target_device"),
    "device": ("edge", "device"),
    "device_fallback": ("edge", "device_fallback"),
    "precision": ("edge", "precision"),
    "draft_cache_dir": ("edge", "cache_dir"),
    "adaptive_gamma": ("edge", "adaptive_gamma"),
    "gamma_min": ("edge", "gamma_min"),
    "gamma_max": ("edge", "gamma_max"),
    "draft_ahead": ("edge", "draft_ahead"),
    "torch_threads": ("models", "torch_threads"),
    "temperature": ("sampling", "temperature"),
    "top_p": ("sampling", "top_p"),
    "top_k": ("sampling", "top_k"),
    "seed": ("sampling", "seed"),
    "max_new_tokens": ("sampling", "max_new_tokens"),
    "gamma": ("edge", "gamma"),
    "max_support": ("edge", "max_support"),
    "tenant": ("edge", "tenant"),
    "backend": ("edge", "backend"),
    "verifier_worker_id": ("verifier", "worker_id"),
    "edge_worker_id": ("edge", "worker_id"),
    "max_batch_sessions": ("verifier", "max_batch_sessions"),
    "max_batch_tokens": ("verifier", "max_batch_tokens"),
    "replay_file": ("edge", "replay_file"),
    "replay_acceptance": ("edge", "replay_acceptance"),
    "network_delay_ms": ("edge", "network_delay_ms"),
    "network_jitter_ms": ("edge", "network_jitter_ms"),
    "multiplex_verdicts": ("edge", "multiplex_verdicts"),
    "log_level": ("log", "level"),
    "log_format": ("log", "format"),
    "metrics_port": ("metrics", "port"),
    "log_redis_stream": ("log", "redis_stream"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override settings.toml and SPECD_* variables)")
    group.add_argument("--config", type=Path, help="settings TOML file (default ./settings.toml)")
    group.add_argument("--redis-url", help="redis://, rediss:// or unix:// URL; empty: embedded")
    group.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"])
    group.add_argument("--torch-threads", type=int, help="torch threads per process (0: default)")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    group.add_argument("--log-format", choices=["auto", "json", "console"])


def _add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target model")
    group.add_argument("--target-model", help="HF folder, hub id or bundled:target")
    group.add_argument("--target-device", help="torch device of the target, e.g. cpu, cuda:0")


def _add_batching(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verifier batching")
    group.add_argument("--max-batch-sessions", type=int, help="sessions per forward pass")
    group.add_argument("--max-batch-tokens", type=int, help="tokens per forward pass")


def _add_draft(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("draft model and sampling")
    group.add_argument("--draft-model", help="HF folder, hub id or bundled:draft")
    group.add_argument("--backend", choices=["torch", "openvino", "genai", "replay"], help="draft backend")
    group.add_argument("--device", help="draft device: auto, cpu, cuda[:N], gpu[.N], npu "
                       "(`specd devices` lists them)")
    group.add_argument("--device-fallback", choices=["fallback", "fail"],
                       help="when the device is missing: use the CPU (fallback) or fail")
    group.add_argument("--precision", choices=["auto", "f32", "f16", "bf16", "int8", "int4"],
                       help="draft precision (auto follows --dtype; f32 is exact)")
    group.add_argument("--draft-cache-dir", help="folder of converted draft models")
    group.add_argument("--gamma", type=int, help="draft tokens per round (adaptive: the start)")
    group.add_argument("--adaptive-gamma", action=argparse.BooleanOptionalAction, default=None,
                       help="choose gamma per round from acceptance and costs")
    group.add_argument("--gamma-min", type=int, help="adaptive gamma's lower bound")
    group.add_argument("--gamma-max", type=int, help="adaptive gamma's upper bound")
    group.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction, default=None,
                       help="draft the next batch while the current one is verified")
    group.add_argument("--max-support", type=int, help="sparse support sent per drafted position")
    group.add_argument("--tenant", help="tenant id of the sessions")
    group.add_argument("--temperature", type=float, help="0 is greedy")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int, help="0 disables top-k")
    group.add_argument("--seed", type=int, help="per-session seed (default: a fresh one)")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--replay-file", help="replay backend: reference continuations file")
    group.add_argument("--replay-acceptance", type=float,
                       help="replay backend: probability each drafted token is the target's")
    group.add_argument("--network-delay-ms", type=float, help="added edge<->broker round trip (ms)")
    group.add_argument("--network-jitter-ms", type=float, help="spread of the added round trip (ms)")
    group.add_argument("--multiplex-verdicts", action="store_true", default=None,
                       help="one XREAD for all sessions' verdicts per edge process")


def _add_operations(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("operations")
    group.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0: off)")
    group.add_argument("--log-redis-stream", action="store_true", default=None,
                       help="also send log lines to the Redis stream <prefix>:logs (see specd logs)")


def _add_logs(commands: Any) -> None:
    logs = commands.add_parser(
        "logs", help="read worker logs (Redis log stream or JSON log files)",
        description="Filter, follow or summarise worker log lines. `specd logs session ID` prints one "
        "session's timeline across its edge and verifiers, then a summary. Reads the Redis stream "
        "<prefix>:logs unless --file is given. A terminal gets a table, a pipe JSON lines.")
    logs.add_argument("what", nargs="*", metavar="session ID",
                      help="`session ID`: the timeline of one session (an id or a unique prefix)")
    logs.add_argument("--file", action="append", type=Path, default=[],
                      help="a JSON log file (repeatable), e.g. the demo's --log-dir files")
    logs.add_argument("--session", help="session id or prefix")
    logs.add_argument("--tenant")
    logs.add_argument("--worker", help="worker id or glob, e.g. 'edge-*'")
    logs.add_argument("--level", choices=["debug", "info", "warning", "error"], help="lowest level shown")
    logs.add_argument("--event", help="event name or glob, e.g. 'verify.*'")
    logs.add_argument("--since", help="ISO time or relative (30s, 10m, 2h, 1d)")
    logs.add_argument("--until", help="ISO time or relative")
    logs.add_argument("--limit", type=int, default=0, help="only the last N matching lines")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    group = logs.add_argument_group("settings")
    group.add_argument("--config", type=Path, help="settings TOML file (default ./settings.toml)")
    group.add_argument("--redis-url", help="redis://, rediss:// or unix:// URL")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specd", description="Distributed speculative decoding: edge drafters, cloud verifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="verifier + edge workers on an embedded Redis",
                               description="Start one verifier and several edge workers (processes) "
                               "on an embedded Redis with the bundled model pair, stream the text, "
                               "print per-session and total figures.")
    demo.add_argument("--edges", type=int, default=3, help="edge worker processes (default 3)")
    demo.add_argument("--sessions-per-edge", type=int, default=1, help="sessions per edge (default 1)")
    demo.add_argument("--prompt", action="append", help="a prompt (repeatable); default: built-ins")
    demo.add_argument("--log-dir", type=Path, help="where worker logs go (default: a temp folder)")
    demo.add_argument("--json", action="store_true", help="also print the report as JSON")

    verifier = commands.add_parser("verifier", help="run a verifier worker",
                                   description="Run a verifier worker against a Redis server.")
    verifier.add_argument("--worker-id", dest="verifier_worker_id", help="stable worker id")
    verifier.add_argument("--check", action="store_true",
                          help="exit 0 if the worker (any, without --worker-id) has a live heartbeat")
    verifier.add_argument("--workers", type=int, default=1,
                          help="run N verifier processes (ids WORKER-ID-0..N-1); SIGTERM reaches all")

    pool = commands.add_parser("pool", help="inspect the verifier pool",
                               description="Inspect the verifier pool in Redis: workers, sessions per "
                               "worker, KV memory use, queue depths, per-tenant load.")
    pool.add_argument("action", choices=["status"])
    pool.add_argument("--json", action="store_true", help="print one JSON object")

    edge = commands.add_parser("edge", help="run an edge worker for some prompts",
                               description="Run an edge worker: draft for its prompts and have "
                               "them verified by the pool.")
    edge.add_argument("--worker-id", dest="edge_worker_id", help="stable worker id")
    edge.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    edge.add_argument("--prompts-file", type=Path, help="JSONL with a text field, or plain text lines")
    edge.add_argument("--field", default="text", help="JSONL field holding the prompt (default text)")
    edge.add_argument("--events", action="store_true", help="print JSON events (tokens, results)")
    edge.add_argument("--check", action="store_true", help="exit 0 if an edge has a live heartbeat")

    generate = commands.add_parser("generate", help="generate for one prompt",
                                   description="Generate for one prompt: speculative (through "
                                   "Redis; embedded when no URL is configured), target-only or "
                                   "draft-only.")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--mode", choices=["speculative", "target", "draft"], default="speculative")
    generate.add_argument("--json", action="store_true", help="print one JSON object")

    devices = commands.add_parser("devices", help="list the draft devices of each backend",
                                  description="List, per draft backend, whether it is installed, "
                                  "the devices it can use on this machine and what --device auto picks.")
    devices.add_argument("--json", action="store_true", help="print one JSON object")

    loadtest = _add_loadtest(commands)
    for sub in (demo, verifier, edge, generate, pool, devices, loadtest):
        _add_common(sub)
    for sub in (demo, verifier, edge, generate, loadtest):  # the edge names the target it expects
        _add_target(sub)
    for sub in (demo, verifier, loadtest):
        _add_batching(sub)
    for sub in (demo, edge, generate, loadtest):
        _add_draft(sub)
    for sub in (verifier, edge):
        _add_operations(sub)
    _add_logs(commands)
    eval_cli.add_parser(commands)

    train = commands.add_parser("train-pair", help="train the bundled tiny draft/target pair",
                                add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)
    report = commands.add_parser("pair-report", help="measure a draft/target pair", add_help=False)
    report.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _add_loadtest(commands: Any) -> argparse.ArgumentParser:
    loadtest = commands.add_parser(
        "loadtest", help="load-test a verifier pool with N edge processes x M sessions",
        description="Start (or use, with --redis-url and --no-verifiers) a verifier pool, run edge "
        "worker processes against it and report throughput, latency percentiles, acceptance, "
        "verifier batching and broker overhead. See docs/loadtest.md.")
    loadtest.add_argument("--edges", type=int, default=4, help="edge worker processes (default 4)")
    loadtest.add_argument("--sessions-per-edge", type=int, default=8,
                          help="concurrent sessions per edge process (default 8)")
    loadtest.add_argument("--verifiers", type=int, default=1, help="verifier processes to start (default 1)")
    loadtest.add_argument("--no-verifiers", action="store_true",
                          help="start no verifier: use the pool already serving --redis-url")
    loadtest.add_argument("--duration", type=float, default=0.0,
                          help="seconds to keep starting sessions (default: run --prompts sessions)")
    loadtest.add_argument("--prompts", type=int, default=0,
                          help="sessions to run per point (default: one per concurrent session)")
    loadtest.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    loadtest.add_argument("--prompts-file", type=Path,
                          help="SpecBench questions .jsonl, HumanEval .json, any JSONL (--field) or text")
    loadtest.add_argument("--field", default="text", help="JSONL field holding the prompt (default text)")
    loadtest.add_argument("--prompt-limit", type=int, default=0, help="use only the first N prompts")
    loadtest.add_argument("--sweep-sessions", type=_int_list, default=[],
                          help="comma-separated total concurrent sessions, one point each")
    loadtest.add_argument("--sweep-gamma", type=_int_list, default=[],
                          help="comma-separated gammas, one point each")
    loadtest.add_argument("--make-replay", type=Path, metavar="PATH",
                          help="write the target's greedy continuations of the prompts to PATH, then exit")
    loadtest.add_argument("--report", type=Path, help="write the JSON report here")
    loadtest.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts here")
    loadtest.add_argument("--log-dir", type=Path, help="worker logs (default: a temp folder)")
    loadtest.add_argument("--no-progress", action="store_true", help="no live progress line")
    return loadtest


def settings_from_args(args: argparse.Namespace) -> Settings:
    if getattr(args, "config", None):
        import os

        os.environ["SPECD_CONFIG"] = str(args.config)
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in FLAG_TO_SETTING.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return load_settings(overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train-pair", "pair-report"):
        return _run_pair_tool(args.command, args.args)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"specd: {exc}", file=sys.stderr)
        return 2
    sink = None
    if settings.log.redis_stream and args.command in ("verifier", "edge") and not args.check:
        sink = LogSink(settings.log.redis_buffer, settings.log.max_line_bytes)
    configure_logging(settings.log.level, settings.log.format, sink=sink)
    if args.command == "verifier" and args.workers > 1 and not args.check:
        return _verifier_processes(args, settings, list(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[args.command](args, settings)
    except (BackendUnavailableError, DeviceUnavailableError) as exc:
        print(f"specd: {exc}", file=sys.stderr)
        return 2


def _run_pair_tool(command: str, argv: list[str]) -> int:
    if command == "train-pair":
        from specd.pair.train import main as train_main

        return train_main(argv)
    from specd.pair.report import main as report_main

    return report_main(argv)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from specd.demo import DEFAULT_PROMPTS, run_demo

    report = asyncio.run(run_demo(settings, args.edges, args.sessions_per_edge,
                                  args.prompt or DEFAULT_PROMPTS, args.log_dir))
    if args.json:
        print(json.dumps(report))
    return 0 if len(report["sessions"]) == args.edges * args.sessions_per_edge else 1


def _require_redis(settings: Settings, command: str) -> bool:
    if settings.redis.url:
        return True
    print(f"specd {command}: redis.url is not set (use --redis-url or SPECD_REDIS__URL); "
          "the embedded Redis only serves `specd demo` and `specd generate`", file=sys.stderr)
    return False


def _verifier(args: argparse.Namespace, settings: Settings) -> int:
    from specd.workers import check_health, run_verifier

    if not _require_redis(settings, "verifier"):
        return 2
    if args.check:
        return asyncio.run(check_health(settings, "verifier"))
    return asyncio.run(run_verifier(settings))


def _verifier_processes(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from specd.pool import run_workers, strip_workers_flag

    if not _require_redis(settings, "verifier"):
        return 2
    own = strip_workers_flag(argv[argv.index("verifier") + 1:])
    return run_workers(args.workers, own, settings.verifier.worker_id)


def _pool(args: argparse.Namespace, settings: Settings) -> int:
    from specd.pool import pool_status, print_status

    if not _require_redis(settings, "pool"):
        return 2
    status = asyncio.run(pool_status(settings))
    if args.json:
        print(json.dumps(status))
    else:
        print_status(status)
    return 0


def _edge(args: argparse.Namespace, settings: Settings) -> int:
    from specd.workers import PromptJob, check_health, run_edge

    if not _require_redis(settings, "edge"):
        return 2
    if args.check:
        return asyncio.run(check_health(settings, "edge"))
    prompts = list(args.prompt) + (read_prompts(args.prompts_file, args.field) if args.prompts_file else [])
    if not prompts:
        print("specd edge: give --prompt or --prompts-file", file=sys.stderr)
        return 2
    return asyncio.run(run_edge(settings, [PromptJob(p) for p in prompts], args.events))


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from specd.generate import print_human, run_generate

    result = run_generate(settings, args.prompt, args.mode, args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result, args.prompt)
    return 0


def _devices(args: argparse.Namespace, settings: Settings) -> int:
    from edge_worker.devices import describe_all

    report = describe_all()
    if args.json:
        print(json.dumps(report))
        return 0
    for backend, info in report.items():
        if not info["installed"]:
            print(f"{backend:9} not installed ({info['hint']})")
        elif "error" in info:
            print(f"{backend:9} installed, but listing its devices failed: {info['error']}")
        else:
            devices = ", ".join(str(d) for d in info["devices"])  # type: ignore[attr-defined]
            print(f"{backend:9} {devices}  (auto: {info['auto']})")
    return 0


def _loadtest(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from specd.demo import DEFAULT_PROMPTS
    from specd.loadtest import LoadTestError, LoadTestOptions, finish_outputs, run_loadtest

    prompts = list(args.prompt) + (read_prompts(args.prompts_file, args.field) if args.prompts_file else [])
    prompts = (prompts or list(DEFAULT_PROMPTS))[: args.prompt_limit or None]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="specd-loadtest-"))
    if args.make_replay or (settings.edge.backend == "replay" and not settings.edge.replay_file):
        from specd.replay import make_replay

        path = args.make_replay or log_dir / "replay.json"
        replay = make_replay(settings, prompts, path)
        print(f"replay file: {path} ({len(replay.entries)} prompts, up to "
              f"{replay.max_new_tokens} tokens each)", file=sys.stderr)
        if args.make_replay:
            return 0
        settings.edge.replay_file = str(path)
    options = LoadTestOptions(
        edges=args.edges, sessions_per_edge=args.sessions_per_edge, duration_s=args.duration,
        prompts=args.prompts, prompt_texts=prompts, verifiers=args.verifiers,
        start_verifiers=not args.no_verifiers, sweep_sessions=args.sweep_sessions,
        sweep_gamma=args.sweep_gamma, log_dir=log_dir, progress=not args.no_progress)
    if args.no_verifiers and not settings.redis.url:
        print("specd loadtest: --no-verifiers needs --redis-url (a pool serving it)", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_loadtest(settings, options, command=["specd", *sys.argv[1:]]))
    except LoadTestError as exc:
        print(f"specd loadtest: {exc}", file=sys.stderr)
        return 1
    try:
        finish_outputs(report, args.report, args.plot, sys.stdout)
    except RuntimeError as exc:  # e.g. --plot without matplotlib: the report is already written
        print(f"specd loadtest: {exc}", file=sys.stderr)
        return 2
    return 0 if all(p["error_count"] == 0 for p in report["points"]) else 1


def _logs(args: argparse.Namespace, settings: Settings) -> int:
    from broker.streams import connect_settings
    from specd.logs import Filters, LogsRequest, log_stream_key, parse_time, run_logs

    if args.what and (args.what[0] != "session" or len(args.what) != 2):
        print("specd logs: the only positional form is `specd logs session ID`", file=sys.stderr)
        return 2
    if not args.file and not _require_redis(settings, "logs"):
        return 2
    try:
        filters = Filters(session=args.session, tenant=args.tenant, worker=args.worker, level=args.level,
                          event=args.event, since=parse_time(args.since) if args.since else None,
                          until=parse_time(args.until) if args.until else None)
    except ValueError as exc:
        print(f"specd logs: {exc}", file=sys.stderr)
        return 2
    request = LogsRequest(files=args.file, filters=filters, follow=args.follow,
                          json_mode=args.json or not sys.stdout.isatty(), limit=args.limit,
                          session=args.what[1] if args.what else None)
    key = log_stream_key(settings.redis.key_prefix)
    return run_logs(request, lambda: connect_settings(settings.redis), key)


COMMANDS = {"demo": _demo, "verifier": _verifier, "edge": _edge, "generate": _generate,
            "pool": _pool, "devices": _devices, "loadtest": _loadtest, "logs": _logs}
COMMANDS["eval"] = eval_cli.run


if __name__ == "__main__":
    sys.exit(main())
