"""The HumanEval execution harness: canonical solutions pass, broken ones fail, loops time out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specd.eval.harness import check_completion, check_many, isolation, run_program, truncate_completion

PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
# ../shared beside the clone (CI), or beside the folder of worktrees
SHARED = next((p for p in (Path(__file__).resolve().parents[n] / "shared" / "data" / "humaneval.json"
                           for n in (3, 4)) if p.exists()), Path("missing"))


def test_a_correct_completion_passes_and_a_wrong_one_fails() -> None:
    assert check_completion(PROMPT, "    return a + b\n", TEST, "add").status == "passed"
    wrong = check_completion(PROMPT, "    return a - b\n", TEST, "add")
    assert wrong.status == "failed" and "AssertionError" in wrong.detail
    syntax = check_completion(PROMPT, "    return a +\n", TEST, "add")
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail


def test_a_completion_that_loops_forever_times_out() -> None:
    result = check_completion(PROMPT, "    while True:\n        pass\n", TEST, "add", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed


def test_top_level_code_after_the_function_is_cut_off() -> None:
    completion = "    return a + b\n\nprint(open('/etc/passwd').read())\nwhile True: pass\n"
    assert truncate_completion(completion) == "    return a + b\n"
    assert check_completion(PROMPT, completion, TEST, "add", timeout_s=2.0).passed


@pytest.mark.parametrize("body", [
    "    import socket\n    socket.socket()\n    return a + b\n",
    "    import subprocess\n    subprocess.run(['true'])\n    return a + b\n",
    "    import os\n    os.system('true')\n    return a + b\n",
    "    open('x.txt', 'w').write('x')\n    return a + b\n",
])
def test_network_processes_and_writes_are_refused(body: str) -> None:
    result = check_completion(PROMPT, body, TEST, "add")
    assert result.status == "failed" and "refused by the specd eval sandbox" in result.detail


def test_the_child_has_no_network_and_no_inherited_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    probe = "import sys, os\nassert '/nowhere' not in sys.path and 'PYTHONPATH' not in os.environ\n"
    assert run_program(probe).passed
    assert set(isolation()) == {"interpreter", "network", "limits"}


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/humaneval.json not beside the clone")
def test_every_canonical_humaneval_solution_passes_and_a_broken_one_fails() -> None:
    problems = json.loads(SHARED.read_text())
    jobs = [(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    results = check_many(jobs, timeout_s=10.0)
    assert [p["question_id"] for p, r in zip(problems, results, strict=True) if not r.passed] == []
    broken = [(prompt, "    return None\n", test, entry) for prompt, _, test, entry in jobs[:20]]
    assert not any(r.passed for r in check_many(broken, timeout_s=10.0))
