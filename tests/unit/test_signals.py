"""specd.signals.exit_at_once: a stop signal before a command has started anything exits 130 at
once, without an exception that would have to unwind through native code."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_exits_130_with_one_line(sig: signal.Signals) -> None:
    done = _run(f"""
        import signal
        from specd.signals import exit_at_once
        with exit_at_once("specd generate: interrupted"):
            try:
                signal.raise_signal({int(sig)})
            except BaseException:
                print("unwound")  # must not happen: nothing is raised
        print("went on")
    """)
    assert done.returncode == 130
    assert done.stderr == "specd generate: interrupted\n"
    assert done.stdout == ""


def test_the_handlers_before_it_come_back() -> None:
    done = _run("""
        import signal
        from specd.signals import exit_at_once
        with exit_at_once("x"):
            pass
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            print("interrupted as before")
    """)
    assert done.returncode == 0 and done.stdout == "interrupted as before\n"

