"""A one-line progress bar with ETA on stderr (only on a terminal, or when forced)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, enabled: bool | None = None, out: TextIO | None = None,
                 width: int = 28) -> None:
        self.out = out or sys.stderr
        self.enabled = self.out.isatty() if enabled is None else enabled
        self.total, self.done, self.failed, self.width = total, 0, 0, width
        self.started = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        fraction = self.done / self.total if self.total else 1.0
        filled = int(self.width * fraction)
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        eta_text = _clock(eta) if self.done else "--:--"
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{fraction:4.0%}  failed {self.failed}  elapsed {_clock(elapsed)}  ETA {eta_text}")

    def advance(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self.enabled:
            self.out.write("\r" + self.line())
            self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()
