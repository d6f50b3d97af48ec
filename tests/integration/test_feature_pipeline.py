"""A feature draft end to end through a real redis-server: verdicts carry the target's feature,
the edge drafts from it, and the output is the target's own (greedy), batched across sessions."""

from __future__ import annotations

import asyncio

import pytest
import tiny_models
from local_pool import local_pool

from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import SamplingSpec
from edge_worker.backends.feature_backend import FeatureDraftBackend
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):"]


async def test_feature_draft_sessions_equal_target_greedy(redis_url, tiny_pair, tmp_path) -> None:
    folder = tiny_models.feature_draft_for(tiny_pair["target"], tmp_path / "feature")
    settings = Settings(redis={"url": redis_url, "key_prefix": "it-feat"},
                        models={"target": tiny_pair["target"], "draft": str(folder)},
                        verifier={"idle_block_ms": 20}, edge={"verdict_timeout_s": 30, "gamma": 3})
    async with local_pool(settings) as (verifier, edge):
        assert isinstance(edge.backend, FeatureDraftBackend)
        tokenizer = edge.backend.tokenizer
        results = await asyncio.gather(*(edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=20))
                                         for p in PROMPTS))
        for prompt, result in zip(PROMPTS, results, strict=True):
            reference = generate_target_only(verifier.engine, tokenizer.encode(prompt), SamplingParams(),
                                             frozenset(), 20)
            assert result.token_ids == reference, prompt
            assert result.drafted > 0  # the verdicts' features reached the draft
        assert max(verifier.stats.batch_sizes) > 1
