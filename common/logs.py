"""structlog, configured once per process: JSON lines when not on a terminal, console otherwise.

Context (``worker_id``, ``session_id``) is bound with ``structlog.contextvars`` and merged first,
so every line of a worker carries it.

A process can also hand its lines to a ``LogSink``: a bounded in-memory buffer of JSON lines
that a background task elsewhere (``specd.workers``) drains to a Redis stream. Logging never
waits on Redis: when the buffer is full the line is dropped and counted. This module imports
nothing of ours, so the sink knows nothing of Redis.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from collections import deque
from typing import Any

import structlog

_configured = False
_sink: LogSink | None = None
_write_lock = threading.Lock()


def _current_stderr() -> Any:
    return sys.stderr


def _fallback_streams() -> list[Any]:
    """Where a line goes when its stream is closed: the current stderr, then the process's own."""
    return [s for s in (sys.stderr, sys.__stderr__) if s is not None]


class StreamLogger:
    """A structlog logger that looks its stream up at each write (``resolve``).

    A logger bound to one stream object for good breaks the process once that object is closed
    (pytest's capture, a redirected stderr replaced and closed): every later line would raise
    "I/O operation on closed file". Resolving at write time follows ``sys.stderr`` wherever it
    points now, and a closed stream falls back to the current stderr, then the process's own.
    """

    def __init__(self, resolve: Any) -> None:
        self._resolve = resolve

    def msg(self, message: str) -> None:
        line = message + "\n"
        with _write_lock:
            for stream in [self._resolve(), *_fallback_streams()]:
                try:
                    stream.write(line)
                    stream.flush()
                    return
                except (ValueError, OSError):  # closed, or gone (EPIPE): try the next one
                    continue

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _StreamLoggerFactory:
    def __init__(self, resolve: Any) -> None:
        self._resolve = resolve

    def __call__(self, *args: Any) -> StreamLogger:
        return StreamLogger(self._resolve)


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib root handler, writing to ``sys.stderr`` as it is at each record."""

    def __init__(self, resolve: Any) -> None:
        super().__init__()
        self._resolve = resolve

    @property  # type: ignore[override]
    def stream(self) -> Any:
        current = self._resolve()
        return current if not getattr(current, "closed", False) else (sys.__stderr__ or current)

    @stream.setter
    def stream(self, _value: Any) -> None:  # StreamHandler.__init__ sets it: the property decides
        pass


class LogSink:
    """A bounded, thread-safe buffer of JSON log lines; full means drop (and count), not block."""

    def __init__(self, capacity: int = 10_000, max_value_bytes: int = 8192) -> None:
        self.capacity = capacity
        self.max_value_bytes = max_value_bytes
        self.dropped = 0
        self._lines: deque[str] = deque()
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor: copy the (trimmed) event into the buffer, pass it on unchanged."""
        line = json.dumps({k: self._trim(v) for k, v in event_dict.items()}, default=str)
        self.put(line)
        return event_dict

    def put(self, line: str) -> None:
        with self._lock:
            if len(self._lines) >= self.capacity:
                self.dropped += 1
                return
            self._lines.append(line)

    def take(self, limit: int = 500) -> list[str]:
        """Up to ``limit`` of the oldest lines, removed from the buffer."""
        with self._lock:
            count = min(limit, len(self._lines))
            return [self._lines.popleft() for _ in range(count)]

    def drop(self, count: int) -> None:
        """Count lines that were taken but could not be delivered."""
        with self._lock:
            self.dropped += count

    def __len__(self) -> int:
        return len(self._lines)

    def __bool__(self) -> bool:
        # A sink is there even when empty: ``if sink:`` once meant "no sink" for a fresh one.
        return True

    def _trim(self, value: Any) -> Any:
        if isinstance(value, str) and len(value) > self.max_value_bytes:
            return value[: self.max_value_bytes] + f"...[{len(value) - self.max_value_bytes} more]"
        return value


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None,
                      sink: LogSink | None = None, interactive: bool = False) -> None:
    """Configure structlog and the stdlib root logger; later calls are no-ops.

    Logs go to stderr as it is at each write (or to ``stream``; a closed one falls back to the
    current stderr): a stream closed after configuration never breaks the process.
    ``interactive``: generated text streams to the same terminal, so lines below warning and
    libraries' deprecation warnings stay out of it.
    """
    global _configured, _sink
    if _configured:
        return
    resolve = _current_stderr if stream is None else (lambda: stream)
    stream = resolve()
    if interactive:
        level = level if level in ("warning", "error") else "warning"
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers loads
        logging.getLogger("transformers").setLevel(logging.ERROR)
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if sink is not None:
        processors.append(sink)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_StreamLoggerFactory(resolve),  # the stream is looked up at each write
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[_CurrentStderrHandler(resolve)])
    _sink = sink
    _configured = True


def log_sink() -> LogSink | None:
    """The sink this process's logging feeds, if ``configure_logging`` was given one."""
    return _sink


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def bind(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)
