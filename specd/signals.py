"""The one signal helper of the long-running commands: what SIGINT and SIGTERM do while they run.

``specd.cli`` makes both signals raise ``KeyboardInterrupt`` by default (exit 130); a command
that stops more gently (a worker drains, ``serve`` finishes its streams, ``eval`` cancels its run)
installs its handler here, for both signals at once, in its event loop (``on_stop_signals``) or,
in a process without one, for the whole process (``forward_stop_signals``). Workers also bound
the drain: ``drain_then_exit`` (a second signal, or the grace period, exits at once). Before a
command has started anything, while it imports the native stack, a signal exits at once
(``exit_at_once``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from common.logs import get_logger

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = get_logger("specd.signals")


def on_stop_signals(handler: Callable[[int], Any]) -> Callable[[], None]:
    """``handler(signum)`` on SIGINT/SIGTERM in the running event loop; returns what removes it."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, handler, sig)

    def remove() -> None:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    return remove


@contextlib.contextmanager
def exit_at_once(line: str) -> Iterator[None]:
    """While nothing that would need stopping has started: SIGINT/SIGTERM print ``line`` and exit
    130 at once, without unwinding.

    Why not ``KeyboardInterrupt``: importing torch runs Python callbacks from C++ (pybind11). An
    exception raised by a signal inside one cannot unwind through the C++ frames around it, and
    the process aborts (``terminate called after throwing ... error_already_set``, a core dump)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    message = (line + "\n").encode()

    def exit_now(_signum: int, _frame: Any) -> None:
        os.write(2, message)
        os._exit(130)

    previous = {sig: signal.signal(sig, exit_now) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def forward_stop_signals(handler: Callable[[int], Any]) -> None:
    """``handler(signum)`` on SIGINT/SIGTERM for the whole process (no event loop: ``pool --workers``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: handler(signum))


def drain_then_exit(stop: asyncio.Event, grace_s: float = 30.0) -> list[int]:
    """SIGINT/SIGTERM set ``stop``: workers finish their batch and drain.

    Whatever state the worker is in (draining, reconnecting to Redis), it is gone ``grace_s`` after
    the first signal, and at once on a second one (exit 130; children die with it, common.procs).
    Returns the signals received, for the exit code (``stopped_exit_code``).
    """
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if stop.is_set():
            log.warning("worker.stop_forced", signal=signum)
            os._exit(130)
        stop.set()
        watchdog = threading.Timer(grace_s, _forced_exit, args=(grace_s,))
        watchdog.daemon = True
        watchdog.start()

    on_stop_signals(on_signal)
    return received


def stopped_exit_code(received: list[int]) -> int:
    """Ctrl-C is an interruption (130, the exit-code table); SIGTERM, a service manager's orderly
    stop after a drain, is a success (0)."""
    return 130 if signal.SIGINT in received else 0


def _forced_exit(grace_s: float) -> None:
    log.warning("worker.stop_timeout", grace_s=grace_s)
    os._exit(130)
