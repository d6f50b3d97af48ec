"""Executing HumanEval completions against their tests, each in a confined child process.

Confinement, strongest first (``isolation()`` reports what this machine gave):
- a fresh interpreter, ``python -I -B`` (no site-packages of the user, no PYTHONPATH, no cwd on
  the path, no bytecode written), started in an empty temporary folder, in its own process group;
- a network namespace of its own (``unshare -n``, or ``unshare -rn`` without root) when the
  kernel allows it: no interface but a downed loopback;
- an audit hook installed before the completion runs that refuses sockets, subprocesses, exec,
  fork, ctypes, file writes and deletions (a safety net also where no namespace is available);
- resource limits: CPU seconds, address space, file size, no core dumps; a wall-clock time limit
  after which the whole process group is killed (status ``timeout``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# HumanEval's usual stop sequences: the function body ends where top-level code begins.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

GUARD = '''\
import sys as _s
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "ctypes.", "os.remove", "os.rmdir", "os.rename",
            "shutil.rmtree", "os.chmod", "os.chown", "os.truncate", "os.kill", "os.putenv")
def _specd_guard(event, args, _blocked=_BLOCKED):
    if event.startswith(_blocked):
        raise PermissionError("refused by the specd eval sandbox: " + event)
    if event == "open" and len(args) > 2 and (
            (isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
            or (isinstance(args[2], int) and args[2] & 0o3103)):
        raise PermissionError("refused by the specd eval sandbox: writing " + str(args[0]))
_s.addaudithook(_specd_guard)
del _s, _specd_guard, _BLOCKED
'''
# open flags refused above: O_WRONLY 0o1 | O_RDWR 0o2 | O_CREAT 0o100 | O_TRUNC 0o1000 | O_APPEND 0o2000


@dataclass(frozen=True)
class ExecResult:
    status: str  # passed | failed | timeout
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


FENCE = "```"
KEPT_TOP_LEVEL = ("def ", "async def ", "class ", "import ", "from ", "@")
"""A whole solution keeps only these top-level statements (and what is indented under them):
its example calls, prints and asserts are dropped, as EvalPlus' sanitizer does."""


def truncate_completion(text: str) -> str:
    """The completion up to the first stop sequence (what HumanEval scores)."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def fenced_code(text: str) -> str:
    """The first fenced code block's body (to the end when its fence is never closed), else the text.

    An instruct model answers in Markdown: the code sits between ``` fences, prose around it."""
    start = text.find(FENCE)
    if start < 0:
        return text
    body = text[start + len(FENCE):]
    body = body[body.find("\n") + 1:] if "\n" in body else ""  # drop the info string (python)
    end = body.find(FENCE)
    return body if end < 0 else body[:end]


def top_level_definitions(code: str) -> str:
    """Only the imports, functions and classes of ``code`` (see ``KEPT_TOP_LEVEL``)."""
    kept, keeping = [], False
    for line in code.splitlines():
        if line and not line[0].isspace():  # a new top-level statement
            keeping = line.startswith(KEPT_TOP_LEVEL)
        if keeping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def completion_source(completion: str, entry_point: str) -> str:
    """What follows the prompt in the program: a base model's continuation of the prompt, cut at
    the first stop sequence; or, when the completion (its fenced code block, if any) defines
    ``entry_point`` itself (an instruct model's whole answer), that code's definitions, which
    replace the prompt's stub."""
    code = fenced_code(completion)
    if entry_point and re.search(rf"^(async )?def {re.escape(entry_point)}\(", code, re.MULTILINE):
        return "\n" + top_level_definitions(code)
    return truncate_completion(code)


def program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{GUARD}\n{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """The unshare command that gives a child its own network namespace here, or ()."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "-n"), (unshare, "-rn")):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    return ()


def isolation() -> dict[str, str]:
    prefix = _netns_prefix()
    return {
        "interpreter": "python -I -B in an empty temp folder, own process group",
        "network": f"own network namespace ({' '.join(['unshare', *prefix[1:]])}) + audit hook"
        if prefix else "audit hook only (no network namespace available)",
        "limits": "RLIMIT_CPU, RLIMIT_AS 2 GiB, RLIMIT_FSIZE 1 MiB, no core; wall-clock kill",
    }


def _limits(cpu_s: int) -> None:  # runs in the child before exec
    import resource

    for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, 2 << 30),
                         (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_CORE, 0)):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(limit, (value, value))


def run_program(source: str, timeout_s: float = 5.0) -> ExecResult:
    """Run ``source`` confined; passed iff it exits 0 within ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="specd-exec-") as folder:
        path = os.path.join(folder, "candidate.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        command = [*_netns_prefix(), sys.executable, "-I", "-B", path]
        child = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True, env={"PATH": "/usr/bin:/bin"},
                                 preexec_fn=functools.partial(_limits, int(timeout_s) + 1))
        try:
            _, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            return ExecResult("timeout", f"still running after {timeout_s:g}s")
    if child.returncode == 0:
        return ExecResult("passed")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecResult("failed", lines[-1][:300] if lines else f"exit status {child.returncode}")


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, 9)
    child.communicate()


def check_completion(prompt: str, completion: str, test: str, entry_point: str,
                     timeout_s: float = 5.0) -> ExecResult:
    return run_program(program(prompt, completion_source(completion, entry_point), test, entry_point),
                       timeout_s)


def check_many(jobs: list[tuple[str, str, str, str]], timeout_s: float = 5.0,
               workers: int = 2) -> list[ExecResult]:
    """``check_completion`` for each (prompt, completion, test, entry_point), a few at a time."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda job: check_completion(job[0], job[1], job[2], job[3], timeout_s),
                             jobs))
