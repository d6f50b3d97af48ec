"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

On Linux a child asks the kernel for a parent-death signal (``prctl(PR_SET_PDEATHSIG)``); the
setting survives ``execve``, so a two-line Python shim sets it and then becomes the real command.
That avoids ``preexec_fn``, which is unsafe in a process with threads (torch, asyncio executors).
Elsewhere the command runs as is: children are stopped on every exit path the parent survives.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from common.settings import ENV_PREFIX, Settings

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


def _env_value(value: Any) -> str:
    """A setting as pydantic-settings parses it from the environment (lists and maps as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def child_env(settings: Settings, url: str) -> dict[str, str]:
    """The one way settings reach a child ``specd`` process: every effective setting as a
    ``SPECD_*`` variable (they win over any settings file; never on a command line, where the
    embedded Redis URL's password would show), on Redis ``url``, logging JSON, one torch and
    one OpenMP thread each unless configured (children share the CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX.upper())}
    for section, values in settings.model_dump().items():
        for key, value in values.items():
            if value is not None:  # unset (None) stays unset: the child resolves it the same way
                env[f"{ENV_PREFIX.upper()}{section.upper()}__{key.upper()}"] = _env_value(value)
    env.update({f"{ENV_PREFIX.upper()}REDIS__URL": url, f"{ENV_PREFIX.upper()}LOG__FORMAT": "json",
                "PYTHONUNBUFFERED": "1"})
    if not settings.models.torch_threads:
        env[f"{ENV_PREFIX.upper()}MODELS__TORCH_THREADS"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
