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


FENCED = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n\nThis adds `a` and `b`."
RAMBLING = ("from typing import List\n\ndef add(a, b):\n    return a + b\n\n# Example usage:\n"
            "print(add(1, 2))\nassert add(1, 1) == 3\nadd([1, 2")  # cut off mid-call at max tokens


@pytest.mark.parametrize(("answer", "status"), [
    (FENCED, "passed"),  # an instruct model's Markdown answer: the fenced code is the solution
    (RAMBLING, "passed"),  # its examples, prints and asserts, and a cut-off tail, are dropped
    ("```python\ndef add(a, b):\n    return a - b\n```", "failed"),
    ("```python\ndef add(a, b):\n    return a +", "failed"),  # a fence never closed: all of it
    ("The answer is to add them.", "failed"),  # prose only: the prompt's stub returns None
])
def test_a_whole_answer_that_defines_the_function_is_scored_as_its_code(answer: str, status: str) -> None:
    assert check_completion(PROMPT, answer, TEST, "add", timeout_s=2.0).status == status


def test_rescore_checks_recorded_answers_again_and_rebuilds_the_summary(tmp_path: Path) -> None:
    from specd.cli import main
    from specd.eval.records import RecordFile

    data = tmp_path / "humaneval.json"
    data.write_text(json.dumps([{"task_id": "T/0", "prompt": PROMPT, "test": TEST, "entry_point": "add"}]))
    out = tmp_path / "out"
    out.mkdir()
    block = {"text": FENCED, "token_ids": [1], "new_tokens": 1, "time_s": 1.0, "tokens_per_s": 1.0,
             "passed": False, "exec_status": "failed", "exec_detail": "SyntaxError: invalid syntax"}
    rounds = {"gamma": 4, "matches_target": True, "rounds": 1, "drafted": 1, "accepted": 0,
              "acceptance_rate": 0.0, "mean_accepted_length": 1.0, "draft_ms": 1.0, "queue_ms": 0.0,
              "verify_ms": 1.0, "transport_ms": 0.0, "first_token_ms": 1.0}
    record = {"question_id": "T/0", "category": "coding", "suite": "humaneval", "prompt": PROMPT,
              "target": {**block, "target_forward_passes": 1},
              "speculative": [{**block, "target_forward_passes": 1, **rounds}]}
    (out / "records.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["eval", "--suite", "humaneval", "--data", str(data), "--out", str(out), "--rescore", "--json"]
    assert main(argv) == 0
    [again] = RecordFile(out / "records.jsonl").read()
    assert again["target"]["passed"] and again["speculative"][0]["passed"]
    assert "exec_detail" not in again["target"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality"]["target"]["pass@1"] == 1.0
    assert main(["eval", "--suite", "wmt", "--data", str(data), "--out", str(out), "--rescore"]) == 2
