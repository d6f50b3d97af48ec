"""``specd train-draft`` on tiny models: before/after report, the best draft kept, resume after a kill.

A run killed (SIGKILL) after a checkpoint and resumed with ``--resume`` must end with the same
weights as the same run left alone: the checkpoint carries the optimiser, the batch RNG and the
step, and the data (with the target's held-out paths) is reloaded rather than rebuilt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from specd.train_draft import main as train_main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("draftdata") / "docs.jsonl"
    lines = [json.dumps({"text": text * 3, "id": i}) for i, text in enumerate(tiny_models.CORPUS[:40])]
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(tiny_pair: dict, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--target", tiny_pair["target"], "--draft", tiny_pair["draft"], "--data", str(data),
            "--out", str(out), "--steps", "8", "--checkpoint-every", "2", "--threads", "1",
            "--seq-len", "32", "--batch-size", "4", "--eval-prompts", "4", "--eval-tokens", "8",
            "--prompt-tokens", "8", "--top-k", "8", "--lr", "3e-3", "--self-generate", "8",
            "--generate-prompts", "8", *extra]


def test_killed_run_resumes_to_the_same_weights(tiny_pair, data_file, tmp_path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train_main(_args(tiny_pair, data_file, whole)) == 0
    report = json.loads((whole / "report.json").read_text())
    assert [e["step"] for e in report["evals"]] == [0, 2, 4, 6, 8]
    assert report["before"]["positions"] > 0 and "gamma_4" in report["after"]["tokens_per_round"]
    assert report["after"]["greedy_acceptance"] >= report["before"]["greedy_acceptance"]  # the best is kept
    assert (whole / "draft" / "model.safetensors").is_file()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "specd", "train-draft", *_args(tiny_pair, data_file, killed)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for the event, not for a time
        if line.startswith("checkpoint step 4"):
            proc.kill()
            break
    proc.wait()
    proc.stdout.close()
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert not (killed / "report.json").exists()

    assert train_main(_args(tiny_pair, data_file, killed)) == 2  # a checkpoint, no --resume: refused
    assert train_main(_args(tiny_pair, data_file, killed, "--resume", "--seed", "9")) == 2  # other settings
    assert train_main(_args(tiny_pair, data_file, killed, "--resume")) == 0
    resumed = json.loads((killed / "report.json").read_text())
    assert [e["step"] for e in resumed["evals"]] == [0, 2, 4, 6, 8]
    assert resumed["before"] == report["before"]
    a = load_file(str(whole / "checkpoint" / "model.safetensors"))
    b = load_file(str(killed / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bad_input_is_a_clear_error(tiny_pair, tmp_path, capsys) -> None:
    assert train_main(_args(tiny_pair, tmp_path / "missing.jsonl", tmp_path / "o")) == 2
    assert "no such file" in capsys.readouterr().err
    other = tiny_models.build_tokenizer(corpus=tiny_models.OTHER_CORPUS)
    model = tiny_models.random_model(other, 5, hidden=32, layers=1)
    folder = tiny_models.save(model, other, tmp_path / "other")
    text = tmp_path / "t.txt"
    text.write_text("def f():\n    return 1\n" * 50)
    args = _args(tiny_pair, text, tmp_path / "o2")
    args[args.index("--draft") + 1] = str(folder)
    assert train_main(args) == 2
    assert "incompatible" in capsys.readouterr().err
