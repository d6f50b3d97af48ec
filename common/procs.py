"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

On Linux a child asks the kernel for a parent-death signal (``prctl(PR_SET_PDEATHSIG)``); the
setting survives ``execve``, so a two-line Python shim sets it and then becomes the real command.
That avoids ``preexec_fn``, which is unsafe in a process with threads (torch, asyncio executors).
Elsewhere the command runs as is: children are stopped on every exit path the parent survives.
"""

from __future__ import annotations

import os
import signal
import sys

_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1,int(sys.argv[1]))\n"  # 1 = PR_SET_PDEATHSIG
    "os.getppid()==int(sys.argv[2]) or os._exit(1)\n"  # the parent died before prctl took effect
    "os.execv(sys.argv[3],sys.argv[3:])\n"
)


def dies_with_parent(argv: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``argv`` (``argv[0]`` an absolute path) wrapped so the process gets ``sig`` when we die."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _SHIM, str(int(sig)), str(os.getpid()), *argv]
