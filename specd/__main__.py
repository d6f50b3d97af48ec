"""``python -m specd`` and the ``specd`` script: the CLI, with stop signals handled from the start."""

import os
import signal
import sys


def _exit_now(_signum: int, _frame: object) -> None:
    os._exit(130)


def run() -> int:
    # Until the CLI takes over, Ctrl-C or SIGTERM exits at once (130): nothing has been started
    # yet that would need stopping, and an exception raised by a signal inside an import's native
    # code cannot always unwind (specd.signals.exit_at_once). After the command, the same holds:
    # it has stopped what it started, and the interpreter is only shutting down.
    signal.signal(signal.SIGINT, _exit_now)
    signal.signal(signal.SIGTERM, _exit_now)
    from specd.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
