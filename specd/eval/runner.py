"""Running questions in waves through the three modes and writing one record per question.

A wave is ``concurrency`` questions. Their target-only and draft-only generations run one at a
time (nothing else runs meanwhile, so their per-question times are undisturbed), then all their
speculative sessions run at once, one gamma after the other, so the verifier batches them; then
their records are written. Per-question times are the generation's own; the run's ``phases`` give
each mode's suite throughput (tokens over the phase's wall time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.models import load_causal_lm, resolve_model_path
from common.settings import Settings
from common.wire import SamplingSpec
from edge_worker.client import EdgeClient, new_seed
from specd.eval import harness
from specd.eval.conversation import Conversation, Dialogue
from specd.eval.modes import draft_generate, speculative_generate, target_generate
from specd.eval.progress import Progress
from specd.eval.records import MODES, RecordFile, mode_block, speculative_block
from specd.eval.suites import Question
from specd.generation import local_verifier, redis_url_for
from specd.runtime import build_draft_backend, edge_broker, edge_config, make_broker, require_standalone
from specd.workers import sampling_spec
from verifier_worker.engine import TargetEngine


@dataclass
class EvalOptions:
    suite: str
    out_dir: Path
    modes: tuple[str, ...] = MODES
    gammas: tuple[int, ...] = (4,)
    concurrency: int = 8
    resume: bool = False
    progress: bool | None = None  # None: on a terminal
    exec_timeout_s: float = 5.0
    exec_workers: int = 2

    @property
    def records_path(self) -> Path:
        return self.out_dir / "records.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.out_dir / "summary.json"


@dataclass
class Models:
    tokenizer: Any
    engine: TargetEngine | None
    backend: Any
    clients: dict[int, EdgeClient]
    stops: frozenset[int]
    context_limit: int
    redis: str


@dataclass
class Phase:
    wall_s: float = 0.0
    tokens: int = 0

    def report(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "tokens": self.tokens,
                "tokens_per_s": round(self.tokens / self.wall_s, 3) if self.wall_s else 0.0}


def context_limit(settings: Settings) -> int:
    """The smaller of the target's and the draft's position windows (4096 if neither says)."""
    from transformers import AutoConfig

    limits = []
    for name in (settings.models.target, settings.models.draft):
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(name, settings.edge.cache_dir),
                                                trust_remote_code=settings.models.trust_remote_code)
            limits.append(int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0))
        except (OSError, ValueError):
            continue
    return min([x for x in limits if x > 0] or [4096])


@contextlib.asynccontextmanager
async def open_models(settings: Settings, options: EvalOptions) -> AsyncIterator[Models]:
    """The models and sessions a run needs, closed (embedded Redis and verifier too) on exit."""
    async with contextlib.AsyncExitStack() as stack:
        backend = build_draft_backend(settings) if {"draft", "speculative"} & set(options.modes) else None
        if backend is not None and "draft" in options.modes:
            require_standalone(backend, settings.models.draft)
        engine, tokenizer, stops, redis = None, None, frozenset[int](), "none"
        if "target" in options.modes:
            models = settings.models
            target = load_causal_lm(models.target, models.dtype, models.target_device,
                                    models.trust_remote_code, cache_dir=settings.edge.cache_dir)
            engine = TargetEngine(target.model, target.vocab_size, settings.pool.kv_budget_tokens)
            tokenizer, stops = target.tokenizer, target.eos_token_ids
        if backend is not None:  # the edge encodes the prompts and sets the stop ids
            tokenizer, stops = backend.tokenizer, backend.eos_token_ids
        clients: dict[int, EdgeClient] = {}
        if "speculative" in options.modes and backend is not None:
            url, embedded = await stack.enter_async_context(redis_url_for(settings))
            if embedded:  # nobody else can reach an embedded Redis: serve it ourselves
                await stack.enter_async_context(local_verifier(settings, url))
            broker = make_broker(settings, url)
            stack.push_async_callback(broker.close)
            for gamma in options.gammas:
                config = dataclasses.replace(edge_config(settings), gamma=gamma)
                clients[gamma] = EdgeClient(backend, edge_broker(settings, broker), config,
                                            max(1, options.concurrency))
            redis = "embedded" if embedded else url
        yield Models(tokenizer, engine, backend, clients, stops, context_limit(settings), redis)


@dataclass
class _Pending:
    """A question between its baselines and its record."""

    question: Question
    seed: int
    blocks: dict[str, Any] = field(default_factory=dict)
    dialogue: Dialogue | None = None
    error: str | None = None


class EvalRun:
    def __init__(self, settings: Settings, options: EvalOptions, models: Models, records: RecordFile,
                 progress: Progress) -> None:
        self.settings, self.options, self.models = settings, options, models
        self.records, self.progress = records, progress
        self.conversation = Conversation(models.tokenizer, models.context_limit,
                                         settings.sampling.max_new_tokens)
        self.phases: dict[str, Phase] = {}

    def spec_for(self, seed: int) -> SamplingSpec:
        return dataclasses.replace(sampling_spec(self.settings, self.models.stops), seed=seed)

    def _seed(self, index: int) -> int:
        base = self.settings.sampling.seed
        return base + index if base is not None else new_seed()

    async def run(self, questions: list[tuple[int, Question]]) -> None:
        size = max(1, self.options.concurrency)
        for start in range(0, len(questions), size):
            wave = [_Pending(q, self._seed(index), error=q.error)
                    for index, q in questions[start:start + size]]
            await self._wave(wave)

    async def _wave(self, wave: list[_Pending]) -> None:
        for mode in ("target", "draft"):
            if mode in self.options.modes:
                await self._baseline(mode, [p for p in wave if p.error is None])
        for gamma, client in self.models.clients.items():
            await self._speculative(gamma, client, [p for p in wave if p.error is None])
        if self.options.suite == "humaneval":
            await asyncio.to_thread(self._execute, [p for p in wave if p.error is None])
        for pending in wave:
            self.records.append(self._record(pending))
            self.progress.advance(1, failed=int(pending.error is not None))

    async def _baseline(self, mode: str, wave: list[_Pending]) -> None:
        phase = self.phases.setdefault(mode, Phase())
        for pending in wave:
            spec = self.spec_for(pending.seed)
            generate = (target_generate(self.models.engine, spec) if mode == "target" and self.models.engine
                        else draft_generate(self.models.backend, spec, self.settings.edge.max_support))
            started = time.perf_counter()
            try:
                dialogue = await self.conversation.run(pending.question.turns, generate)
            except Exception as exc:  # noqa: BLE001 - one question's failure is its record's error
                pending.error = f"{mode}: {type(exc).__name__}: {exc}"
                continue
            finally:
                phase.wall_s += time.perf_counter() - started
            pending.dialogue = pending.dialogue or dialogue
            pending.blocks[mode] = mode_block(dialogue, self.conversation.texts(dialogue), pending.seed)
            phase.tokens += pending.blocks[mode]["new_tokens"]

    async def _speculative(self, gamma: int, client: EdgeClient, wave: list[_Pending]) -> None:
        phase = self.phases.setdefault(f"speculative@{gamma}", Phase())

        async def one(pending: _Pending) -> Dialogue:
            generate = speculative_generate(client, self.spec_for(pending.seed))
            return await self.conversation.run(pending.question.turns, generate)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in wave), return_exceptions=True)
        phase.wall_s += time.perf_counter() - started
        for pending, result in zip(wave, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                pending.error = f"speculative: {type(result).__name__}: {result}"
                continue
            pending.dialogue = pending.dialogue or result
            block = speculative_block(result, self.conversation.texts(result), pending.seed, gamma,
                                      pending.blocks.get("target"))
            pending.blocks.setdefault("speculative", []).append(block)
            phase.tokens += block["new_tokens"]

    def _execute(self, wave: list[_Pending]) -> None:
        """HumanEval: run every mode's completion against the question's tests (see harness)."""
        check_blocks([(p.question, p.blocks) for p in wave], self.options.exec_timeout_s,
                     self.options.exec_workers)

    def _record(self, pending: _Pending) -> dict[str, Any]:
        q = pending.question
        if pending.error is not None:
            return {"question_id": q.question_id, "category": q.category, "error": pending.error}
        record: dict[str, Any] = {"question_id": q.question_id, "category": q.category,
                                  "suite": self.options.suite, "prompt": q.turns[0]}
        if len(q.turns) > 1:
            record["turns"] = list(q.turns)
        if q.reference is not None:
            record["reference"] = q.reference
        dialogue = pending.dialogue
        if dialogue is not None:
            record["prompt_tokens"] = len(dialogue.prompt_ids)
            record["truncated_tokens"] = dialogue.truncated_tokens
        record.update(pending.blocks)
        return record

    def run_info(self, wall_s: float, skipped: int) -> dict[str, Any]:
        sampling = self.settings.sampling
        return {
            "wall_s": round(wall_s, 3), "concurrency": self.options.concurrency,
            "modes": list(self.options.modes), "gammas": list(self.options.gammas),
            "redis": self.models.redis, "max_new_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "target_model": self.settings.models.target, "draft_model": self.settings.models.draft,
            "context_limit": self.models.context_limit, "resumed_skipping": skipped,
            "phases": {name: phase.report() for name, phase in self.phases.items()},
            "throughput_speedup": self._throughput_speedup(),
        }

    def _throughput_speedup(self) -> dict[str, float]:
        """Suite throughput of each speculative phase over the target-only phase's."""
        target = self.phases.get("target")
        base = target.tokens / target.wall_s if target and target.wall_s else 0.0
        return {name: round(phase.tokens / phase.wall_s / base, 4) for name, phase in self.phases.items()
                if name.startswith("speculative") and phase.wall_s and base}


def check_blocks(answers: list[tuple[Question, dict[str, Any]]], timeout_s: float, workers: int) -> None:
    """Run every mode's recorded completion of each question against its tests (HumanEval) and
    store ``passed``, ``exec_status`` and ``exec_detail`` in its block."""
    jobs, blocks = [], []
    for question, modes in answers:
        for block in _all_blocks(modes):
            jobs.append((question.turns[0], block["text"], question.test or "", question.entry_point or ""))
            blocks.append(block)
    for block, result in zip(blocks, harness.check_many(jobs, timeout_s, workers), strict=True):
        block.update(passed=result.passed, exec_status=result.status)
        block.pop("exec_detail", None)
        if result.detail:
            block["exec_detail"] = result.detail


def _all_blocks(blocks: dict[str, Any]) -> list[dict[str, Any]]:
    return [blocks[m] for m in ("target", "draft") if m in blocks] + list(blocks.get("speculative", []))
