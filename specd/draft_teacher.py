"""The teacher data of a draft started from a target: the target's own greedy chat answers.

``specd train-draft --from-target`` distils a new, small draft on what the target actually says
at run time: chat-templated prompts (Spec-Bench first turns, WMT de->en, HumanEval) answered
greedily by the target, in batches (left-padded, sorted by length: far faster on a CPU than one
prompt at a time), keeping at every generated position the target's greedy token and its top-k
logits (soft labels for free: no second target pass during training).

Spec-Bench questions are split by id: ``question_id % 4 == 0`` is held out (20 of every 80 in
each category) and only scored, never trained on; WMT and HumanEval only train.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SPECBENCH_GROUPS = {"translation", "summarization", "qa", "math_reasoning", "rag"}
"""Spec-Bench's five 80-question categories; the other eight (10 each) are its MT-Bench turns."""


@dataclass
class ChatPrompt:
    source: str  # specbench / wmt / humaneval
    category: str  # Spec-Bench group (mt_bench for the MT-Bench categories), else the source
    ident: str
    ids: list[int]  # chat-templated prompt tokens (generation prompt included)
    held_out: bool = False


@dataclass
class TeacherData:
    prompts: list[ChatPrompt]
    paths: list[list[int]]  # the target's greedy continuation per prompt (stop token kept)
    top_ids: list[torch.Tensor] = field(default_factory=list)  # [len(path), k] int32
    top_logits: list[torch.Tensor] = field(default_factory=list)  # [len(path), k] float16


def specbench_group(category: str) -> str:
    return category if category in SPECBENCH_GROUPS else "mt_bench"


def _clip(tokenizer: Any, text: str, limit: int) -> str:
    """Keep a long user message's head and tail (instructions sit at either end)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return text
    head, tail = (limit * 3) // 4, limit - (limit * 3) // 4
    return tokenizer.decode(ids[:head]) + "\n...\n" + tokenizer.decode(ids[-tail:])


def chat_ids(tokenizer: Any, text: str, limit: int) -> list[int]:
    messages = [{"role": "user", "content": _clip(tokenizer, text, limit)}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def build_prompts(data_dir: Path, tokenizer: Any, limit: int = 320, wmt: int = 150,
                  humaneval: int = 100) -> list[ChatPrompt]:
    """Spec-Bench first turns (held out by id), the first ``wmt`` WMT and ``humaneval`` HumanEval prompts."""
    prompts: list[ChatPrompt] = []
    for line in (data_dir / "specbench_questions.jsonl").read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            prompts.append(ChatPrompt("specbench", specbench_group(q["category"]), str(q["question_id"]),
                                      chat_ids(tokenizer, q["turns"][0], limit),
                                      held_out=int(q["question_id"]) % 4 == 0))
    for record in json.loads((data_dir / "wmt_de_en.json").read_text())[:wmt]:
        text = record["prompt"][0] if isinstance(record["prompt"], list) else record["prompt"]
        prompts.append(ChatPrompt("wmt", "wmt", str(record["question_id"]), chat_ids(tokenizer, text, limit)))
    for record in json.loads((data_dir / "humaneval.json").read_text())[:humaneval]:
        prompts.append(ChatPrompt("humaneval", "humaneval", str(record["question_id"]),
                                  chat_ids(tokenizer, record["prompt"], limit)))
    return prompts


@torch.inference_mode()
def generate_batch(model: Any, prompts: list[list[int]], new_tokens: int, pad: int, stop: frozenset[int],
                   top_k: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Greedy continuations of left-padded ``prompts`` with each step's top-k logits."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=pad,
                         eos_token_id=sorted(stop) or None)
    logits = torch.stack(out.logits, dim=1).float()  # [B, T, V]
    values, indices = logits.topk(top_k, dim=-1)
    results = []
    for row in range(len(prompts)):
        path = out.sequences[row, width:].tolist()
        cut = next((i + 1 for i, t in enumerate(path) if t in stop), len(path))
        results.append((path[:cut], indices[row, :cut].to(torch.int32), values[row, :cut].half()))
    return results


def generate_teacher(model: Any, tokenizer: Any, prompts: list[ChatPrompt], new_tokens: int, batch: int,
                     top_k: int, stop: frozenset[int], log: Any = print) -> TeacherData:
    """The target's greedy answers to every prompt, longest-first in batches of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
    slots: list[tuple[list[int], torch.Tensor, torch.Tensor] | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    started = time.monotonic()
    for start in range(0, len(order), batch):
        group = order[start:start + batch]
        for index, result in zip(group, generate_batch(model, [prompts[i].ids for i in group], new_tokens,
                                                       pad, stop, top_k), strict=True):
            slots[index] = result
        done = min(start + batch, len(order))
        log(f"teacher: {done}/{len(order)} prompts answered, {time.monotonic() - started:.0f} s")
    filled = [s for s in slots if s is not None]
    return TeacherData(prompts, [s[0] for s in filled], [s[1] for s in filled], [s[2] for s in filled])


def teacher_state(data: TeacherData) -> dict[str, Any]:
    return {"prompts": [p.__dict__ for p in data.prompts], "paths": data.paths,
            "top_ids": data.top_ids, "top_logits": data.top_logits}


def teacher_from_state(state: dict[str, Any]) -> TeacherData:
    return TeacherData([ChatPrompt(**p) for p in state["prompts"]], state["paths"], state["top_ids"],
                       state["top_logits"])
