"""Prompt lookup, prompt lookup beside a model, and the router, end to end through a real redis-server.

Greedy speculative output must equal the target's own greedy output token for token whichever
drafter proposes (and however often the router switches); a sampled session with the one-hot q
of prompt lookup runs to the end and is reproducible for a seed.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from local_pool import local_pool

from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import SamplingSpec
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):", "import os\nimport sys\nimport os",
           "class Stack:", "for i in range(10):\n    print(i)\nfor i in range(10):"]
DRAFTS = [{"name": "draft", "domains": ["code"]},
          {"name": "unrelated", "model": "UNRELATED"},
          {"name": "lookup", "backend": "prompt_lookup"},
          {"name": "lookup+draft", "backend": "prompt_lookup", "fallback": "draft", "domains": ["long"]}]


def settings_for(redis_url: str, tiny_pair: dict, prefix: str, **edge) -> Settings:
    drafts = [{**d, "model": tiny_pair["unrelated"]} if d.get("model") == "UNRELATED" else d for d in DRAFTS]
    return Settings(redis={"url": redis_url, "key_prefix": prefix},
                    models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                    verifier={"idle_block_ms": 20},
                    edge={"verdict_timeout_s": 30, "drafts": drafts, **edge})


async def _check_greedy(verifier, edge, variants: list[dict]) -> list:
    tokenizer = edge.backend.tokenizer
    base, results = edge.config, []
    for variant in variants:
        edge.config = dataclasses.replace(base, **variant)
        batch = await asyncio.gather(*(
            edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=32)) for p in PROMPTS))
        for prompt, result in zip(PROMPTS, batch, strict=True):
            reference = generate_target_only(verifier.engine, tokenizer.encode(prompt), SamplingParams(),
                                             frozenset(), 32)
            assert result.token_ids == reference, (edge.backend.model_name, variant, prompt)
        results.extend(batch)
    return results


@pytest.mark.parametrize("with_model", [False, True])
async def test_prompt_lookup_greedy_equals_target_greedy(with_model, redis_url, tiny_pair) -> None:
    settings = settings_for(redis_url, tiny_pair, f"pl-{with_model}", backend="prompt_lookup",
                            lookup_with_model=with_model)
    async with local_pool(settings, worker_id="v-lookup") as (verifier, edge):
        assert edge.backend.name == "prompt_lookup"
        results = await _check_greedy(verifier, edge, [dict(gamma=4), dict(gamma=3, draft_ahead=True)])
        assert sum(r.accepted for r in results) > 0  # the repeated prompts do get copied


async def test_prompt_lookup_sampled_session_is_reproducible(redis_url, tiny_pair) -> None:
    settings = settings_for(redis_url, tiny_pair, "pl-sampled", backend="prompt_lookup", gamma=4)
    async with local_pool(settings, worker_id="v-lookup-s") as (_, edge):
        ids = edge.backend.tokenizer.encode(PROMPTS[0])
        spec = SamplingSpec(temperature=0.8, top_p=0.95, seed=5, max_new_tokens=32)
        first, second = await edge.generate(ids, spec), await edge.generate(ids, spec)
        assert first.token_ids == second.token_ids and len(first.token_ids) == 32
        assert first.drafted > 0


async def test_router_greedy_equals_target_greedy_and_reports_picks(redis_url, tiny_pair) -> None:
    settings = settings_for(redis_url, tiny_pair, "router", backend="router")
    async with local_pool(settings, worker_id="v-router") as (verifier, edge):
        router = edge.backend
        assert router.name == "router" and set(router.children) == {d["name"] for d in DRAFTS}
        await _check_greedy(verifier, edge, [dict(gamma=4), dict(gamma=3, draft_ahead=True),
                                              dict(gamma=2, adaptive_gamma=True)])
        reports = list(router.reports)
        assert len(reports) == 3 * len(PROMPTS)
        assert all(r["decisions"] and r["decisions"][0]["reason"] for r in reports)
        picked = {d["drafter"] for r in reports for d in r["decisions"]}
        assert len(picked) >= 2  # it explored, and the output never changed
