"""The ``specd`` command line: demo, verifier, edge, generate, pool, devices, loadtest, pair tools.

Every settings flag is derived from the settings model (``common.settings``): its name, type,
choices, help text and default are written once, on the field. ``SETTING_FLAGS`` only says which
flag spells which field (``specd.flags``). argparse stays the parser underneath, so
a command written elsewhere plugs in as a plain subparser: see ``register`` below.

Failures follow ``specd.failures``: one or two lines, a documented exit code, no traceback unless
``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import edge_worker.drafters  # noqa: F401 - registers the drafters, whose names the settings check
from common import tracing
from common.logs import LogSink, configure_logging
from common.settings import MODEL_PAIRS, ConfigError, Settings, load_settings
from specd.failures import EPILOG, USAGE, report
from specd.flags import (
    _FLAG_OF,
    FLAG_TO_SETTING,
    URL_HELP,
    HelpFormatter,
    Parser,
    SettingFlag,
    _positive_int,
    add_setting_flag,
    add_setting_flags,
)
from specd.prompts import PromptError, read_prompts
from specd.signals import exit_at_once

Handler = Callable[[argparse.Namespace, Settings], int]


def _new_command(commands: Any, name: str, handler: Handler, **kwargs: Any) -> argparse.ArgumentParser:
    """A command of this module; like every command, it carries its handler (``set_defaults``)."""
    parser = commands.add_parser(name, formatter_class=HelpFormatter, epilog=EPILOG, **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def _add_logs(commands: Any) -> argparse.ArgumentParser:
    logs = _new_command(
        commands, "logs", _logs, help="read worker logs (Redis log stream or JSON log files)",
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
    logs.add_argument("--limit", type=int, default=0, help="only the last N matching lines (0: all)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--json", action="store_true", help="JSON lines even on a terminal")
    group = logs.add_argument_group("settings")
    group.add_argument("--config", type=Path, help="settings TOML file (default: ./settings.toml)")
    add_setting_flag(group, SettingFlag("redis.url", "--redis-url"), URL_HELP["needs-url"])
    return logs


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specd")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout without installing
        return "unknown"


CHAT_HELP = ("the prompt is a user message: apply the model's chat template (ignored for a "
             "tokenizer without one, e.g. the tiny pair)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="specd", description="Distributed speculative decoding: edge drafters, cloud verifiers.",
        formatter_class=HelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"specd {_version()}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    needs_url = {"redis.url": URL_HELP["needs-url"]}

    demo = _new_command(commands, "demo", _demo, help="verifier + edge workers on an embedded Redis",
                        description="Start one verifier and several edge workers (processes) on an "
                        "embedded Redis with the configured pair (default: SmolLM2-135M-Instruct and "
                        "its draft; --pair tiny: the bundled tiny code pair), stream the text, print "
                        "per-session and total figures. Prompts are user messages (the chat template "
                        "is applied when the model has one).")
    demo.add_argument("--edges", type=_positive_int, default=3, help="edge worker processes")
    demo.add_argument("--sessions-per-edge", type=_positive_int, default=1, help="sessions per edge")
    demo.add_argument("--prompt", action="append", help="a prompt (repeatable); default: built-in "
                      "questions (code prefixes for the tiny pair)")
    demo.add_argument("--log-dir", type=Path, help="where worker logs go (default: a temp folder)")
    demo.add_argument("--json", action="store_true", help="also print the report as JSON")
    add_setting_flags(demo, "common", "target", "batching", "draft")

    verifier = _new_command(commands, "verifier", _verifier, help="run a verifier worker",
                            description="Run a verifier worker against a Redis server. SIGTERM or "
                            "SIGINT: drain (up to verifier.drain_timeout_s), hand sessions over, exit; "
                            "a second signal exits at once.")
    add_setting_flags(verifier, "verifier-id")
    verifier.add_argument("--check", action="store_true",
                          help="exit 0 if the worker (any, without --worker-id) has a live heartbeat")
    verifier.add_argument("--workers", type=_positive_int, default=1,
                          help="run N verifier processes (ids WORKER-ID-0..N-1); signals reach all, "
                          "and the children die with this process")
    add_setting_flags(verifier, "common", "target", "batching", "operations", overrides=needs_url)

    pool = _new_command(commands, "pool", _pool, help="inspect the verifier pool",
                        description="Inspect the verifier pool in Redis: workers, sessions per "
                        "worker, KV memory use, queue depths, per-tenant load.")
    pool.add_argument("action", choices=["status"])
    pool.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(pool, "common", overrides=needs_url)

    edge = _new_command(commands, "edge", _edge, help="run an edge worker for some prompts",
                        description="Run an edge worker: draft for its prompts and have them "
                        "verified by the pool. Exit 1 if any session failed.")
    add_setting_flags(edge, "edge-id")
    edge.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    edge.add_argument("--prompts-file", type=Path, help="JSONL with a text field, or plain text lines")
    edge.add_argument("--field", default="text", help="JSONL field holding the prompt")
    edge.add_argument("--events", action="store_true", help="print JSON events (tokens, results)")
    edge.add_argument("--chat", action="store_true", help=CHAT_HELP)
    edge.add_argument("--check", action="store_true", help="exit 0 if an edge has a live heartbeat")
    add_setting_flags(edge, "common", "target", "draft", "operations", overrides=needs_url)

    generate = _new_command(commands, "generate", _generate, help="generate for one prompt",
                            description="Generate for one prompt: speculative (through Redis; an "
                            "embedded one when redis.url is empty), target-only or draft-only. The "
                            "text goes to stdout, figures and logs to stderr.")
    generate.add_argument("--prompt", required=True, help="the prompt text (not empty)")
    generate.add_argument("--mode", choices=["speculative", "target", "draft"], default="speculative",
                          help="who generates")
    generate.add_argument("--chat", action="store_true", help=CHAT_HELP)
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(generate, "common", "target", "draft")

    devices = _new_command(commands, "devices", _devices, help="list the draft devices of each backend",
                           description="List, per draft backend, whether it is installed, the "
                           "devices it can use on this machine and what --device auto picks.")
    devices.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(devices, "common")

    add_setting_flags(_add_loadtest(commands), "common", "target", "batching", "draft")
    _add_logs(commands)
    _add_pair_tools(commands)
    register(commands)
    _debug_everywhere(commands)
    return parser


def register(commands: Any) -> None:
    """Where commands living in their own modules plug in (one line each).

    A module exposes ``add_parser(commands) -> argparse.ArgumentParser`` (a plain subparser; it may
    call ``add_setting_flags(parser, "common", "target", ...)`` for settings flags) and sets
    ``parser.set_defaults(handler=run)`` with ``run(args, settings) -> int``. Example::

        from specd import serve
        serve.add_parser(commands)
    """
    from specd import acl, chat, models, train_draft
    from specd.eval import cli as eval_cli
    from specd.serve import command as serve_command

    for module in (acl, serve_command, chat, eval_cli, train_draft, models):
        module.add_parser(commands)


def _debug_everywhere(commands: Any) -> None:
    """``--debug`` after the command name too (``specd generate --debug ...``)."""
    for sub in commands.choices.values():
        if not any("--debug" in a.option_strings for a in sub._actions):
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print tracebacks of errors")


def _add_pair_tools(commands: Any) -> None:
    from specd.pair import options

    tools = (("train-pair", "train", "train the bundled tiny draft/target pair", options.TRAIN_DESCRIPTION,
              options.add_train_arguments),
             ("pair-report", "report", "measure a draft/target pair", options.REPORT_DESCRIPTION,
              options.add_report_arguments))
    for name, module, summary, description, add_arguments in tools:
        sub = _new_command(commands, name, _pair_handler(module), help=summary, description=description)
        add_arguments(sub)
        sub.set_defaults(needs_settings=False)


def _pair_handler(module: str) -> Callable[[argparse.Namespace, Settings | None], int]:
    def run(args: argparse.Namespace, _settings: Settings | None) -> int:
        import importlib

        return int(importlib.import_module(f"specd.pair.{module}").run(args))

    return run


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None


def _add_loadtest(commands: Any) -> argparse.ArgumentParser:
    loadtest = _new_command(
        commands, "loadtest", _loadtest, help="load-test a verifier pool with N edge processes x M sessions",
        description="Start (or use, with --redis-url and --no-verifiers) a verifier pool, run edge "
        "worker processes against it and report throughput, latency percentiles, acceptance, "
        "verifier batching and broker overhead. See docs/loadtest.md.")
    loadtest.add_argument("--edges", type=_positive_int, default=4, help="edge worker processes")
    loadtest.add_argument("--sessions-per-edge", type=_positive_int, default=8,
                          help="concurrent sessions per edge process")
    loadtest.add_argument("--verifiers", type=int, default=1, help="verifier processes to start")
    loadtest.add_argument("--no-verifiers", action="store_true",
                          help="start no verifier: use the pool already serving --redis-url")
    loadtest.add_argument("--duration", type=float, default=0.0,
                          help="seconds to keep starting sessions (0: run --prompts sessions)")
    loadtest.add_argument("--prompts", type=int, default=0,
                          help="sessions to run per point (0: one per concurrent session)")
    loadtest.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    loadtest.add_argument("--prompts-file", type=Path,
                          help="SpecBench questions .jsonl, HumanEval .json, any JSONL (--field) or text")
    loadtest.add_argument("--field", default="text", help="JSONL field holding the prompt")
    loadtest.add_argument("--prompt-limit", type=int, default=0, help="use only the first N prompts (0: all)")
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
        os.environ["SPECD_CONFIG"] = str(args.config)
    overrides: dict[str, dict[str, Any]] = {}
    if getattr(args, "model_pair", None):
        target, draft = MODEL_PAIRS[args.model_pair]
        overrides["models"] = {"target": target, "draft": draft}
    for flag, (section, key) in FLAG_TO_SETTING.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return load_settings(overrides, flag_names=dict(_FLAG_OF))


def _interactive(args: argparse.Namespace) -> bool:
    """Generated text streams to a terminal that also shows stderr: keep log lines out of it."""
    streams = args.command == "chat" or (args.command == "generate" and not args.json)
    return streams and sys.stdout.isatty() and sys.stderr.isatty() and args.log_level is None


def _quiet_interrupts(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A Ctrl-C that lands where Python cannot raise it (an import's clean-up, a finalizer) is
    "ignored" with a traceback, and the command would run on, perhaps with a half-imported
    module (seen: numpy without ``matrix``). Raise it again, where it can land."""

    def unraisable(info: Any) -> Any:
        if isinstance(info.exc_value, KeyboardInterrupt | SystemExit):
            signal.raise_signal(signal.SIGINT)
            return None
        return hook(info)

    return unraisable


def main(argv: list[str] | None = None) -> int:
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet_interrupts(hook)
    # SIGTERM unwinds like Ctrl-C, so every exit path stops what the command started.
    stops = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in stops}
    _SIGNALS.watch()
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:  # before the command ran (parsing flags, importing)
        return report("", exc, False)
    finally:
        _SIGNALS.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook


class _SignalLog:
    """Which signals arrived, from the interpreter's wakeup fd (written whatever the handler).

    A Ctrl-C that lands inside a library's import can come out as another error ("could not
    import module ..."), with no KeyboardInterrupt left in its chain: the log still tells that
    the user interrupted, so the failure is reported as an interruption (130), not a bug."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._previous = -1

    def watch(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._fds = (read, write)
        self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def interrupted(self) -> bool:
        if self._fds is None:
            return False
        try:
            seen = os.read(self._fds[0], 4096)
        except BlockingIOError:
            return False
        return bool(set(seen) & {signal.SIGINT, signal.SIGTERM})

    def close(self) -> None:
        if self._fds is not None:
            signal.set_wakeup_fd(self._previous)
            for fd in self._fds:
                os.close(fd)
            self._fds = None


_SIGNALS = _SignalLog()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad flag: one line, exit 2
    _import_native_stack(args)
    settings: Settings | None = None
    try:
        if getattr(args, "needs_settings", True) is False:  # e.g. the pair tools: no settings
            return int(args.handler(args, None))
        settings = settings_from_args(args)
        _configure_logs(args, settings)
        tracing.configure(f"specd-{args.command}", settings.tracing.otlp_endpoint, settings.tracing.file)
        if args.command == "verifier" and args.workers > 1 and not args.check:
            return _verifier_processes(args, settings, list(sys.argv[1:] if argv is None else argv))
        code = int(args.handler(args, settings))
        sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is caught below
        return code
    except BrokenPipeError:
        return _reader_gone()
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place failures are reported
        url = settings.redis.url if settings is not None else ""
        if not isinstance(exc, KeyboardInterrupt) and _SIGNALS.interrupted():
            exc = KeyboardInterrupt()  # the failure followed a Ctrl-C/SIGTERM (see _SignalLog)
        return report(args.command, exc, bool(getattr(args, "debug", False)), url)
    finally:
        tracing.shutdown()  # flush the spans of a traced run (a no-op when tracing is off)


# Commands that never load a model start without importing torch (a second or two).
_NO_MODELS = frozenset({"logs", "pool", "acl", "models"})


def _import_native_stack(args: argparse.Namespace) -> None:
    """Import torch and transformers first, before the command starts anything: a Ctrl-C or
    SIGTERM meanwhile exits at once, as it cannot unwind through their imports (signals.exit_at_once)."""
    supervisor = args.command == "verifier" and getattr(args, "workers", 1) > 1  # its children load
    if args.command in _NO_MODELS or getattr(args, "check", False) or supervisor:
        return
    with exit_at_once(f"specd {args.command}: interrupted"):
        import torch  # noqa: F401
        import transformers  # noqa: F401


def _reader_gone() -> int:
    """stdout's reader left (``specd pool status --json | head``): not an error of ours. Point
    stdout at /dev/null so that the interpreter's last flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _configure_logs(args: argparse.Namespace, settings: Settings) -> None:
    sink = None
    if settings.log.redis_stream and args.command in ("verifier", "edge") and not args.check:
        sink = LogSink(settings.log.redis_buffer, settings.log.max_line_bytes)
    configure_logging(settings.log.level, settings.log.format, sink=sink, interactive=_interactive(args))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from specd.demo import default_prompts, run_demo

    report_ = asyncio.run(run_demo(settings, args.edges, args.sessions_per_edge,
                                   args.prompt or default_prompts(settings), args.log_dir))
    if args.json:
        print(json.dumps(report_))
    return 0 if len(report_["sessions"]) == args.edges * args.sessions_per_edge else 1


def _require_redis(settings: Settings, command: str) -> None:
    if not settings.redis.url:
        raise ConfigError("redis.url is not set: give --redis-url or SPECD_REDIS__URL (the embedded "
                          "Redis only serves `specd demo`, `specd generate` and `specd loadtest`)")


def _verifier(args: argparse.Namespace, settings: Settings) -> int:
    from specd.workers import check_health, run_verifier

    _require_redis(settings, "verifier")
    if args.check:
        return asyncio.run(check_health(settings, "verifier"))
    return asyncio.run(run_verifier(settings))


def _verifier_processes(args: argparse.Namespace, settings: Settings, argv: list[str]) -> int:
    from specd.pool import run_workers, strip_workers_flag

    _require_redis(settings, "verifier")
    own = strip_workers_flag(argv[argv.index("verifier") + 1:])
    return run_workers(args.workers, own, settings.verifier.worker_id)


def _pool(args: argparse.Namespace, settings: Settings) -> int:
    from specd.pool import pool_status, print_status

    _require_redis(settings, "pool")
    status = asyncio.run(pool_status(settings))
    if args.json:
        print(json.dumps(status))
    else:
        print_status(status)
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file, args.field) if args.prompts_file else [])
    empty = [i for i, p in enumerate(args.prompt) if not p]
    if empty:
        raise PromptError("--prompt is empty: give some text")
    return prompts


def _edge(args: argparse.Namespace, settings: Settings) -> int:
    from specd.workers import PromptJob, check_health, run_edge

    _require_redis(settings, "edge")
    if args.check:
        return asyncio.run(check_health(settings, "edge"))
    prompts = _prompts(args)
    if not prompts:
        raise PromptError("no prompts: give --prompt TEXT or --prompts-file PATH")
    return asyncio.run(run_edge(settings, [PromptJob(p, chat=args.chat) for p in prompts], args.events))


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from specd.generation import print_human, run_generate

    if not args.prompt:
        raise PromptError("--prompt is empty: give some text")
    result = run_generate(settings, args.prompt, args.mode, args.json, args.chat)
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result, args.prompt + ("\n" if args.chat else ""))
    return 0


def _devices(args: argparse.Namespace, settings: Settings) -> int:
    from edge_worker.devices import describe_all

    described = describe_all()
    if args.json:
        print(json.dumps(described))
        return 0
    for backend, info in described.items():
        if not info["installed"]:
            print(f"{backend:9} not installed ({info['hint']})")
        elif "drafter" in info:
            print(f"{backend:9} {info['drafter']}")
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

    prompts = (_prompts(args) or list(DEFAULT_PROMPTS))[: args.prompt_limit or None]
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
        raise ConfigError("--no-verifiers needs --redis-url (a pool serving it)")
    try:
        result = asyncio.run(run_loadtest(settings, options, command=["specd", *sys.argv[1:]]))
    except LoadTestError as exc:
        print(f"specd loadtest: {exc}", file=sys.stderr)
        return 1
    try:
        finish_outputs(result, args.report, args.plot, sys.stdout)
    except RuntimeError as exc:  # e.g. --plot without matplotlib: the report is already written
        print(f"specd loadtest: {exc}", file=sys.stderr)
        return USAGE
    return 0 if all(p["error_count"] == 0 for p in result["points"]) else 1


def _logs(args: argparse.Namespace, settings: Settings) -> int:
    from broker.streams import connect_settings
    from specd.logs import Filters, LogsRequest, log_stream_key, parse_time, run_logs

    if args.what and (args.what[0] != "session" or len(args.what) != 2):
        raise ConfigError("the only positional form is `specd logs session ID`")
    if not args.file:
        _require_redis(settings, "logs")
    try:
        filters = Filters(session=args.session, tenant=args.tenant, worker=args.worker, level=args.level,
                          event=args.event, since=parse_time(args.since) if args.since else None,
                          until=parse_time(args.until) if args.until else None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    request = LogsRequest(files=args.file, filters=filters, follow=args.follow,
                          json_mode=args.json or not sys.stdout.isatty(), limit=args.limit,
                          session=args.what[1] if args.what else None)
    key = log_stream_key(settings.redis.key_prefix)
    return run_logs(request, lambda: connect_settings(settings.redis), key)




if __name__ == "__main__":
    sys.exit(main())
