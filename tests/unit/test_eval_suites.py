"""Eval suite readers, selection, records file and the conversation's prompt ids (no models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specd.eval.conversation import Conversation
from specd.eval.records import RecordFile
from specd.eval.suites import SuiteError, read_suite, select


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_specbench_turns_categories_and_a_malformed_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
        '{"question_id": 2, "category": "qa", "turns": ["broken',
        {"question_id": 3, "category": "qa", "turns": []},
        {"question_id": 4, "category": "qa", "turns": ["What is 2+2?"]},
    ])
    questions = read_suite("specbench", path)
    assert [q.question_id for q in questions] == ["1", "line-2", "3", "4"]
    assert questions[0].turns == ("Write a poem.", "Shorter.") and questions[0].category == "writing"
    assert "line 2 is not JSON" in (questions[1].error or "")
    assert "turns" in (questions[2].error or "") and questions[3].error is None


def test_wmt_records_or_columns(tmp_path: Path) -> None:
    rows = [{"question_id": 7, "prompt": ["Translate German to English: Hallo"], "label": ["Hello"]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"prompt": ["Hallo", "Welt"], "label": ["Hello", "World"]}))
    a = read_suite("wmt", tmp_path / "a.json")
    assert a[0].turns == ("Translate German to English: Hallo",) and a[0].reference == "Hello"
    b = read_suite("wmt", tmp_path / "b.json")
    assert [(q.question_id, q.reference) for q in b] == [("1", "Hello"), ("2", "World")]


def test_cnndm_and_humaneval_and_plain_jsonl(tmp_path: Path) -> None:
    story = [{"id": "x1", "article": "A long story.", "highlights": "Story."}]
    (tmp_path / "c.json").write_text(json.dumps(story))
    c = read_suite("cnndm", tmp_path / "c.json")[0]
    assert "A long story." in c.turns[0] and c.reference == "Story." and c.category == "summarization"
    (tmp_path / "h.json").write_text(json.dumps([{"task_id": "HumanEval/0", "prompt": "def f():\n",
                                                  "test": "def check(c):\n    pass\n", "entry_point": "f"}]))
    h = read_suite("humaneval", tmp_path / "h.json")[0]
    assert h.question_id == "HumanEval/0" and h.entry_point == "f"
    j = read_suite("jsonl", write_jsonl(tmp_path / "p.jsonl", [{"body": "hi", "category": "k"}, {"x": 1}]),
                   text_field="body")
    assert j[0].turns == ("hi",) and j[0].category == "k" and "`body`" in (j[1].error or "")


def test_unreadable_files_and_duplicate_ids_are_suite_errors(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="no such file"):
        read_suite("specbench", tmp_path / "missing.jsonl")
    dup = write_jsonl(tmp_path / "d.jsonl", [{"question_id": 1, "turns": ["a"]}] * 2)
    with pytest.raises(SuiteError, match="appears twice"):
        read_suite("specbench", dup)


def test_select_filters_samples_with_a_seed_and_limits(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "category": "ab"[i % 2], "turns": [str(i)]}
                                              for i in range(40)])
    questions = read_suite("specbench", path)
    only_a = select(questions, ["a"])
    assert {q.category for q in only_a} == {"a"} and len(only_a) == 20
    s1, s2 = select(questions, sample=10, seed=3), select(questions, sample=10, seed=3)
    assert [q.question_id for q in s1] == [q.question_id for q in s2] and len(s1) == 10
    assert [int(q.question_id) for q in s1] == sorted(int(q.question_id) for q in s1)  # file order kept
    assert s1 != select(questions, sample=10, seed=4)
    assert len(select(questions, max_examples=5)) == 5


def test_record_file_cuts_a_half_written_last_line(tmp_path: Path) -> None:
    records = RecordFile(tmp_path / "r.jsonl")
    records.start(resume=False)
    records.append({"question_id": "1", "x": 1})
    with open(records.path, "a") as f:
        f.write('{"question_id": "2", "x"')  # a run killed mid-write
    assert records.done_ids() == {"1"}
    records.start(resume=True)
    records.append({"question_id": "2", "x": 2})
    records.append({"question_id": "3", "error": "timed out"})
    assert [r["question_id"] for r in records.read()] == ["1", "2", "3"]
    assert len(records.path.read_text().splitlines()) == 3
    records.start(resume=True)  # an error record is dropped: its question runs again
    assert records.done_ids() == {"1", "2"} and len(records.path.read_text().splitlines()) == 2


class _Tokenizer:
    """Characters as ids; a chat template when asked for one."""

    def __init__(self, template: bool = False) -> None:
        self.chat_template = "yes" if template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], tokenize: bool, add_generation_prompt: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


async def test_turns_run_as_a_conversation_plain_or_with_a_template() -> None:
    from specd.eval.conversation import TurnOutput

    seen: list[str] = []

    async def generate(ids: list[int]) -> TurnOutput:
        seen.append("".join(chr(i) for i in ids))
        return TurnOutput([ord("R"), ord(str(len(seen)))], 1.0)

    plain = Conversation(_Tokenizer(), 1000, 10)
    dialogue = await plain.run(("Q1", "Q2"), generate)
    assert seen == ["Q1", "Q1R1\n\nQ2"] and plain.texts(dialogue) == ["R1", "R2"]
    seen.clear()
    await Conversation(_Tokenizer(template=True), 1000, 10).run(("Q1", "Q2"), generate)
    assert seen == ["<user>Q1<assistant>", "<user>Q1<assistant>R1<user>Q2<assistant>"]


def test_a_context_too_long_keeps_its_head_and_tail() -> None:
    conversation = Conversation(_Tokenizer(), context_limit=116, max_new_tokens=16)  # budget 100
    ids, dropped = conversation.fit(list(range(250)))
    assert len(ids) == 100 and dropped == 150 and ids[:25] == list(range(25)) and ids[-1] == 249


def test_a_data_file_not_in_utf8_is_a_usage_error_of_one_line(tmp_path: Path, capsys) -> None:
    """Issue 21, item 4: the clean exit-2 message edge and loadtest give, not an internal error."""
    from specd.cli import main

    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(SuiteError, match="not UTF-8"):
        read_suite("jsonl", data)
    assert main(["eval", "--suite", "jsonl", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("specd eval: data file") and "not UTF-8 text (byte 0xe9" in err, err
    assert len(err.splitlines()) == 1 and "internal error" not in err


def _refuse(*_args, **_kwargs):
    raise AssertionError("ran before the inputs were checked")


def test_eval_checks_plotting_and_model_paths_before_running(tmp_path: Path, capsys, monkeypatch) -> None:
    """Issue 21, item 12: `--plot` without matplotlib and `--draft-model ./nope` fail at once
    (exit 2, one line), not after the whole suite ran or the target loaded."""
    import sys

    from specd.cli import main
    from specd.eval import cli as eval_cli

    data = write_jsonl(tmp_path / "q.jsonl", [{"text": "def f():"}])
    monkeypatch.setattr(eval_cli, "_evaluate", _refuse)
    argv = ["eval", "--suite", "jsonl", "--data", str(data), "--out", str(tmp_path / "out")]
    assert main([*argv, "--draft-model", "./nope"]) == 2
    assert capsys.readouterr().err.strip() == "specd eval: model folder ./nope does not exist"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*argv, "--plot", str(tmp_path / "plots")]) == 2
    assert "--plot needs matplotlib: pip install" in capsys.readouterr().err
