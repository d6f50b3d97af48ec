"""The failure policy of every command: which errors are the user's, their exit codes, one message.

A user error (a bad flag, setting, path or prompt, an unreachable Redis, a failed session) ends
in one or two lines on stderr naming the problem and what to do, and a documented exit code; a
traceback only with ``--debug``. Anything else is a bug: one line, exit 70, and ``--debug`` for
the traceback to report.
"""

from __future__ import annotations

import sys
import traceback

OK, FAILED, USAGE, REDIS, SOFTWARE, INTERRUPTED = 0, 1, 2, 3, 70, 130

EXIT_CODES = {
    OK: "success",
    FAILED: "the run failed: a session was rejected or failed, a worker is unhealthy",
    USAGE: "bad usage: a flag, setting, model path or prompt (the message names it)",
    REDIS: "Redis cannot be reached (or refused the credentials)",
    SOFTWARE: "an internal error (a bug): rerun with --debug and report the traceback",
    INTERRUPTED: "interrupted by SIGINT or SIGTERM",
}

EPILOG = "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


def _user_errors() -> list[tuple[type[BaseException], int]]:
    """(exception type, exit code), most specific first; imported lazily (torch is slow)."""
    from broker.embedded import EmbeddedRedisError
    from broker.reach import NoVerifierAlive, RedisUnavailable
    from common.models import ModelLoadError, TokenizerMismatchError
    from common.settings import ConfigError
    from edge_worker.client import SessionFailed
    from edge_worker.devices import BackendUnavailableError, DeviceUnavailableError
    from specd.prompts import PromptError

    rejected: list[tuple[type[BaseException], int]] = []
    try:
        from edge_worker.client import PromptRejected

        rejected = [(PromptRejected, USAGE)]
    except ImportError:  # pragma: no cover - an edge client without the prompt check
        pass
    return [*rejected, (ConfigError, USAGE), (ModelLoadError, USAGE), (TokenizerMismatchError, USAGE),
            (PromptError, USAGE), (BackendUnavailableError, USAGE), (DeviceUnavailableError, USAGE),
            (RedisUnavailable, REDIS), (EmbeddedRedisError, REDIS), (SessionFailed, FAILED),
            (NoVerifierAlive, FAILED)]


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code of a user error, or None for a bug."""
    if _interrupted(exc):
        return INTERRUPTED
    try:
        known = _user_errors()
    except Exception:  # noqa: BLE001 - a broken import must not hide the original error
        return None
    for kind, code in known:
        if isinstance(exc, kind):
            return code
    return _redis_error_code(exc)


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C or SIGTERM, also when it surfaced as another error (e.g. in the middle of an import)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _redis_error_code(exc: BaseException) -> int | None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoPermissionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, NoPermissionError):  # the ACL user lacks a command or key: the user's setup
        return FAILED
    return REDIS if isinstance(exc, RedisConnectionError | RedisTimeoutError) else None


def report(command: str, exc: BaseException, debug: bool, redis_url: str = "") -> int:
    """Print the one-line message (and the traceback with ``--debug``); return the exit code."""
    code = exit_code_of(exc)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    prefix = f"specd {command}" if command else "specd"
    if code == INTERRUPTED:
        print(f"{prefix}: interrupted", file=sys.stderr)
    elif code is None:
        print(f"{prefix}: internal error: {type(exc).__name__}: {_line(exc)}"
              + ("" if debug else " (rerun with --debug for the traceback, and report it)"),
              file=sys.stderr)
        return SOFTWARE
    elif code == REDIS and redis_url and not _is_own_message(exc):
        from broker.reach import unreachable

        print(f"{prefix}: {unreachable(redis_url, exc)}", file=sys.stderr)
    else:
        print(f"{prefix}: {exc}", file=sys.stderr)
    return code


def _is_own_message(exc: BaseException) -> bool:
    from broker.embedded import EmbeddedRedisError
    from broker.reach import RedisUnavailable

    return isinstance(exc, RedisUnavailable | EmbeddedRedisError)


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
