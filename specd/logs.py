"""``specd logs``: read worker log lines from the Redis log stream or from JSON log files.

Workers write structlog JSON lines (``--log-format json``, and with ``[log] redis_stream`` also
to the stream ``{prefix}:logs``). This module filters them (session, tenant, worker, level,
event, time), follows them live, and rebuilds one session's timeline across its edge and the
verifiers that served it, with a summary. A terminal gets a table; a pipe gets JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO

from broker.streams import Keys

LOG_FIELD = b"j"
"""The field of a log stream entry that holds one JSON line."""
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Record = dict[str, Any]
Emit = Callable[[Record], None]


def names_session(sid: str, wanted: str) -> bool:
    """Whether ``wanted`` is a prefix of ``sid`` or of its short form (``short_session_id``: the
    default tenant's sessions are printed without their ``default.``)."""
    from broker.streams import DEFAULT_TENANT

    own = DEFAULT_TENANT + "."
    return sid.startswith(wanted) or (sid.startswith(own) and sid[len(own):].startswith(wanted))


def log_stream_key(prefix: str) -> str:
    return Keys(prefix).logs


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when no zone is given) or a relative one: 30s, 10m, 2h, 1d ago."""
    now = now or datetime.now(timezone.utc)
    match = RELATIVE.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * UNITS[match.group(2)])
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601 or 30s, 10m, 2h, 1d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def record_time(record: Record) -> datetime | None:
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        return parse_time(stamp)
    except ValueError:
        return None


@dataclass(frozen=True)
class Filters:
    session: str | None = None  # a session id or a unique prefix of one
    tenant: str | None = None
    worker: str | None = None  # a worker id, or a glob such as edge-*
    level: str | None = None  # the lowest level shown
    event: str | None = None  # an event name or glob, e.g. verify.*
    since: datetime | None = None
    until: datetime | None = None

    def match(self, record: Record) -> bool:
        checks = (
            self.session is None or names_session(str(record.get("session_id") or ""), self.session),
            self.tenant is None or record.get("tenant") == self.tenant,
            self.worker is None or fnmatch.fnmatchcase(str(record.get("worker_id", "")), self.worker),
            self.level is None or LEVELS.get(str(record.get("level")), 0) >= LEVELS[self.level],
            self.event is None or fnmatch.fnmatchcase(str(record.get("event", "")), self.event),
        )
        return all(checks) and self._in_window(record)

    def _in_window(self, record: Record) -> bool:
        if self.since is None and self.until is None:
            return True
        moment = record_time(record)
        if moment is None:
            return False
        return (self.since is None or moment >= self.since) and (self.until is None or moment <= self.until)


# ---------------------------------------------------------------- sources


def parse_line(line: str | bytes) -> Record | None:
    """One JSON log line as a dict; anything else (tracebacks, console lines) is None."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "event" in record else None


def read_files(paths: Iterable[Path]) -> Iterator[Record]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                record = parse_line(line)
                if record is not None:
                    yield record


def follow_files(paths: list[Path], emit: Emit, filters: Filters, poll_s: float = 0.5,
                 stop: Callable[[], bool] = lambda: False) -> None:
    """Emit the lines appended to the files from now on, until ``stop()`` or Ctrl-C."""
    handles = [open(path, encoding="utf-8", errors="replace") for path in paths]  # noqa: SIM115
    try:
        for handle in handles:
            handle.seek(0, 2)
        while not stop():
            quiet = True
            for handle in handles:
                for line in handle.readlines():
                    quiet = False
                    record = parse_line(line)
                    if record is not None and filters.match(record):
                        emit(record)
            if quiet:
                time.sleep(poll_s)
    finally:
        for handle in handles:
            handle.close()


def _stream_id(moment: datetime | None, default: str) -> str:
    return str(int(moment.timestamp() * 1000)) if moment is not None else default


async def read_stream(redis: Any, key: str, filters: Filters, page: int = 1000) -> list[Record]:
    """Every entry of the log stream in the filters' time window (stream ids are milliseconds)."""
    start, end = _stream_id(filters.since, "-"), _stream_id(filters.until, "+")
    records: list[Record] = []
    while True:
        entries = await redis.xrange(key, min=start, max=end, count=page)
        records.extend(r for r in (_entry_record(fields) for _, fields in entries) if r is not None)
        if len(entries) < page:
            return records
        last = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
        start = "(" + last


async def follow_stream(redis: Any, key: str, filters: Filters, emit: Emit, last_id: str = "$",
                        block_ms: int = 1000, stop: Callable[[], bool] = lambda: False) -> None:
    """Emit new matching entries as they arrive, until ``stop()`` or Ctrl-C."""
    while not stop():
        reply = await redis.xread({key: last_id}, block=block_ms, count=500)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                record = _entry_record(fields)
                if record is not None and filters.match(record):
                    emit(record)


def _entry_record(fields: Any) -> Record | None:
    raw = fields.get(LOG_FIELD) if isinstance(fields, dict) else None
    return parse_line(raw) if raw is not None else None


# ---------------------------------------------------------------- output

BASE_KEYS = ("timestamp", "level", "event", "worker_id", "session_id")


def format_record(record: Record) -> str:
    """One readable line: time, level, worker, event, session, then the other fields."""
    stamp = str(record.get("timestamp", ""))[11:23]
    rest = " ".join(f"{k}={_short(v)}" for k, v in record.items() if k not in BASE_KEYS)
    session = str(record.get("session_id") or "")[:12]
    return (f"{stamp:12}  {record.get('level', '')!s:7}  {record.get('worker_id', '')!s:24.24}  "
            f"{record.get('event', '')!s:22}  {session:12}  {rest}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def make_emitter(json_mode: bool, out: TextIO) -> Emit:
    def emit(record: Record) -> None:
        print(json.dumps(record) if json_mode else format_record(record), file=out, flush=True)

    return emit


# ---------------------------------------------------------------- one session's timeline

def resolve_session(records: list[Record], wanted: str) -> str:
    """The full session id for an id or a unique prefix (the demo prints 8 characters)."""
    ids = {str(r["session_id"]) for r in records if names_session(str(r.get("session_id") or ""), wanted)}
    if wanted in ids:
        return wanted
    if len(ids) == 1:
        return ids.pop()
    if not ids:
        raise LookupError(f"no log line names session {wanted!r}")
    raise LookupError(f"{wanted!r} is ambiguous: {', '.join(sorted(ids)[:5])}")


def session_timeline(records: Iterable[Record], wanted: str) -> tuple[list[Record], dict[str, Any]]:
    """The session's log lines in time order and a summary of its rounds, tokens and latencies."""
    candidates = [r for r in records if r.get("session_id")]
    sid = resolve_session(candidates, wanted)
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    events = sorted((r for r in candidates if r["session_id"] == sid),
                    key=lambda r: record_time(r) or epoch)  # stable: same-time lines keep file order
    return events, summarise_session(sid, events)


def summarise_session(sid: str, events: list[Record]) -> dict[str, Any]:
    rounds = [e for e in events if e.get("event") == "verify.round"]
    drafted = sum(int(e.get("drafted", 0)) for e in rounds)
    accepted = sum(int(e.get("accepted", 0)) for e in rounds)
    summary: dict[str, Any] = {
        "session_id": sid, "tenant": next((e["tenant"] for e in events if e.get("tenant")), None),
        "rounds": len(rounds), "drafted": drafted, "accepted": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "tokens": sum(int(e.get("committed", 0)) for e in rounds),
        "verifiers": sorted({str(e.get("worker_id")) for e in rounds if e.get("worker_id")}),
        "errors": sum(1 for e in events if e.get("level") in ("warning", "error")
                      and e.get("event") in ("message.rejected", "edge.session.failed", "session.expired")),
    }
    for key in ("queue_ms", "verify_ms", "draft_ms", "batch_size"):
        values = [float(e[key]) for e in rounds if isinstance(e.get(key), int | float)]
        summary[f"mean_{key}"] = round(sum(values) / len(values), 3) if values else None
    final = next((e for e in reversed(events) if e.get("event") == "session.summary"), None)
    edge = next((e for e in reversed(events) if e.get("event") == "edge.session.summary"), None)
    summary["finish"] = (final or {}).get("reason") or (edge or {}).get("finish_reason")
    summary["seconds"] = (final or {}).get("seconds")
    if edge is not None:
        summary.update(edge_worker=edge.get("worker_id"), edge_wall_ms=edge.get("wall_ms"),
                       edge_tokens_per_s=edge.get("tokens_per_s"), edge_tokens=edge.get("tokens"))
    summary["complete"] = final is not None or edge is not None
    return summary


TIMELINE_COLUMNS = [("+s", 8), ("worker", 22), ("event", 20), ("seq", 4), ("drafted", 7),
                    ("accepted", 8), ("batch", 5), ("queue ms", 9), ("verify ms", 9), ("draft ms", 8)]


def _timeline_row(event: Record, origin: datetime | None) -> str:
    moment = record_time(event)
    offset = f"{(moment - origin).total_seconds():.3f}" if moment and origin else ""
    cells = [offset, str(event.get("worker_id", ""))[:22], str(event.get("event", ""))[:20]]
    cells += [_cell(event.get(k)) for k in ("seq", "drafted", "accepted", "batch_size", "queue_ms",
                                            "verify_ms", "draft_ms")]
    row = "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                    for i, (c, (_, w)) in enumerate(zip(cells, TIMELINE_COLUMNS, strict=True)))
    detail = _detail(event)
    return f"{row}  {detail}".rstrip()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _detail(event: Record) -> str:
    name = event.get("event")
    if name == "verify.round":
        return f"finish={event['finish']}" if event.get("finish") else ""
    skip = {*BASE_KEYS, "tenant", "seq", "drafted", "accepted", "batch_size", "queue_ms", "verify_ms",
            "draft_ms", "prompt_ids", "token_ids"}
    return " ".join(f"{k}={_short(v)}" for k, v in event.items() if k not in skip)


def print_timeline(events: list[Record], summary: dict[str, Any], json_mode: bool, out: TextIO) -> None:
    if json_mode:
        for event in events:
            print(json.dumps(event), file=out)
        print(json.dumps({"event": "timeline.summary", **summary}), file=out)
        return
    print(f"session {summary['session_id']} (tenant {summary['tenant']})", file=out)
    print("  ".join(n.rjust(w) if i >= 3 else n.ljust(w)
                    for i, (n, w) in enumerate(TIMELINE_COLUMNS)), file=out)
    origin = next((t for t in map(record_time, events) if t is not None), None)
    for event in events:
        print(_timeline_row(event, origin), file=out)
    rate = summary["acceptance_rate"]
    share = f" ({100 * rate:.1f}%)" if rate is not None else ""
    print(f"\n{summary['rounds']} rounds, {summary['tokens']} tokens, {summary['accepted']}/"
          f"{summary['drafted']} drafted tokens accepted{share}", file=out)
    print("mean per round: " + ", ".join(
        f"{k} {summary[f'mean_{k}']}" for k in ("queue_ms", "verify_ms", "draft_ms", "batch_size")),
        file=out)
    print(f"finish: {summary['finish']}, errors: {summary['errors']}, verifiers: "
          f"{', '.join(summary['verifiers']) or '-'}, edge: {summary.get('edge_worker') or '-'}"
          + (f", edge wall {summary['edge_wall_ms']} ms, {summary['edge_tokens_per_s']} tok/s"
             if summary.get("edge_wall_ms") is not None else ""), file=out)


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class LogsRequest:
    files: list[Path]
    filters: Filters
    follow: bool = False
    json_mode: bool = False
    limit: int = 0  # the last N matching lines (0: all)
    session: str | None = None  # `specd logs session ID`


class EmptyStream(LookupError):
    """The log stream has no line at all: streaming is off (the default) or nothing ran yet."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the log stream {key} is empty: workers write to it only with log.redis_stream = true "
            "(SPECD_LOG__REDIS_STREAM=true; off by default); or read their JSON log files with --file")


async def _load(request: LogsRequest, redis_factory: Callable[[], Any], key: str) -> list[Record]:
    if request.files:
        return list(read_files(request.files))
    redis = redis_factory()
    try:
        if not await redis.xlen(key):
            raise EmptyStream(key)
        return await read_stream(redis, key, request.filters if request.session is None else Filters())
    finally:
        await redis.aclose()


def run_logs(request: LogsRequest, redis_factory: Callable[[], Any], key: str,
             out: TextIO | None = None) -> int:
    """Serve ``specd logs``; ``redis_factory`` makes a client when no file is given."""
    out = out or sys.stdout
    try:
        records = asyncio.run(_load(request, redis_factory, key))
    except EmptyStream as exc:
        print(f"specd logs: {exc}", file=sys.stderr)
        if not request.follow or request.session is not None:
            return 1
        records = []  # following: the lines to come are shown
    if request.session is not None:
        try:
            events, summary = session_timeline(records, request.session)
        except LookupError as exc:
            print(f"specd logs: {exc}", file=sys.stderr)
            return 1
        print_timeline(events, summary, request.json_mode, out)
        return 0
    emit = make_emitter(request.json_mode, out)
    matching = [r for r in records if request.filters.match(r)]
    for record in matching[-request.limit:] if request.limit else matching:
        emit(record)
    if request.follow:
        with contextlib.suppress(KeyboardInterrupt):
            _follow(request, redis_factory, key, emit)
    return 0


def _follow(request: LogsRequest, redis_factory: Callable[[], Any], key: str, emit: Emit) -> None:
    if request.files:
        follow_files(request.files, emit, request.filters)
        return

    async def go() -> None:
        redis = redis_factory()
        try:
            await follow_stream(redis, key, request.filters, emit)
        finally:
            await redis.aclose()

    asyncio.run(go())
