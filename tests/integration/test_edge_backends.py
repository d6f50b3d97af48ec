"""Every draft backend, adaptive gamma and drafting ahead, end to end through a real redis-server.

Greedy speculative output must equal the target's own greedy output token for token, whatever
the backend, gamma policy or drafting-ahead setting; a seeded sampled session must give the same
tokens with and without drafting ahead (the early batch is the batch that would have been sent).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from local_pool import local_pool

from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import SamplingSpec
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration

PROMPTS = ["def add(a, b):", "import os", "class Stack:", "for i in range(10):", "print(x)"]
PACKAGES = {"openvino": "openvino", "genai": "onnxruntime_genai"}


@pytest.fixture(scope="session")
def edge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conversion cache shared with tests/unit/test_backends.py (same session folder)."""
    path = tmp_path_factory.getbasetemp() / "edge-convert-cache"
    path.mkdir(exist_ok=True)
    return path


def settings_for(redis_url: str, tiny_pair: dict, edge_cache: Path, prefix: str, **edge) -> Settings:
    return Settings(redis={"url": redis_url, "key_prefix": prefix},
                    models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                    verifier={"idle_block_ms": 20},
                    edge={"verdict_timeout_s": 30, "cache_dir": str(edge_cache), **edge})


def pool(settings: Settings):
    return local_pool(settings, worker_id="v-edge-test")


@pytest.mark.parametrize("backend", ["torch", "openvino", "genai"])
async def test_each_backend_greedy_equals_target_greedy(backend, redis_url, tiny_pair, edge_cache) -> None:
    if backend in PACKAGES:
        pytest.importorskip(PACKAGES[backend], reason=f"{backend} backend not installed")
    settings = settings_for(redis_url, tiny_pair, edge_cache, f"eb-{backend}", backend=backend)
    async with pool(settings) as (verifier, edge):
        tokenizer = edge.backend.tokenizer
        assert edge.backend.name == backend and edge.backend.device.lower() == "cpu"
        variants = [dict(gamma=3), dict(gamma=4, adaptive_gamma=True, gamma_min=1, gamma_max=6),
                    dict(gamma=3, draft_ahead=True), dict(gamma=2, adaptive_gamma=True, draft_ahead=True),
                    dict(gamma=4, draft_confidence=0.5),
                    dict(gamma=3, draft_ahead=True, draft_confidence=0.3)]
        base = edge.config
        for variant in variants:
            edge.config = dataclasses.replace(base, **variant)
            results = await asyncio.gather(*(
                edge.generate(tokenizer.encode(p), SamplingSpec(max_new_tokens=24)) for p in PROMPTS))
            for prompt, result in zip(PROMPTS, results, strict=True):
                reference = generate_target_only(verifier.engine, tokenizer.encode(prompt),
                                                 SamplingParams(), frozenset(), 24)
                assert result.token_ids == reference, (backend, variant, prompt)
            if variant.get("draft_ahead"):
                assert sum(r.ahead_hits + r.ahead_misses for r in results) > 0


async def test_drafting_ahead_keeps_seeded_sampling_identical(redis_url, tiny_pair, edge_cache) -> None:
    settings = settings_for(redis_url, tiny_pair, edge_cache, "eb-seeded", gamma=3)
    async with pool(settings) as (_, edge):
        ids = edge.backend.tokenizer.encode("def add(a, b):")
        spec = SamplingSpec(temperature=0.8, top_p=0.95, seed=11, max_new_tokens=24)
        plain = await edge.generate(ids, spec)
        edge.config = dataclasses.replace(edge.config, draft_ahead=True)
        ahead = await edge.generate(ids, spec)
        assert ahead.token_ids == plain.token_ids
        assert ahead.ahead_hits + ahead.ahead_misses > 0


@pytest.fixture(scope="module")
def smol_vocab_pair(real_target: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny random target and a perturbed draft over SmolLM2's real tokenizer (49,152 tokens,
    taken from the GGUF file's dequantised copy): the real vocabulary and chat template at a size
    that converts in seconds."""
    import tiny_models
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("smol-vocab")
    tokenizer = AutoTokenizer.from_pretrained(real_target)
    target = tiny_models.random_model(tokenizer, seed=1)
    draft = tiny_models.perturbed_copy(target, 2, 0.35)
    return {"target": str(tiny_models.save(target, tokenizer, root / "target")),
            "draft": str(tiny_models.save(draft, tokenizer, root / "draft"))}


@pytest.mark.parametrize("backend", ["openvino", "genai"])
async def test_converted_backends_on_the_real_vocabulary(backend, redis_url, smol_vocab_pair,
                                                        edge_cache) -> None:
    """OpenVINO and GenAI convert a draft with the real model's vocabulary (49,152 tokens) and
    stay exact on chat-templated questions."""
    from common.models import encode_prompt

    pytest.importorskip(PACKAGES[backend], reason=f"{backend} backend not installed")
    settings = settings_for(redis_url, smol_vocab_pair, edge_cache, f"eb-smol-{backend}", backend=backend,
                            gamma=3)
    async with pool(settings) as (verifier, edge):
        assert edge.backend.vocab_size == 49152
        prompts = [encode_prompt(edge.backend.tokenizer, q, chat=True)
                   for q in ("What is the capital of France?", "Write a haiku about autumn.")]
        results = await asyncio.gather(*(edge.generate(p, SamplingSpec(max_new_tokens=16)) for p in prompts))
        for prompt, result in zip(prompts, results, strict=True):
            assert result.token_ids == generate_target_only(verifier.engine, prompt, SamplingParams(),
                                                            frozenset(), 16)
        assert sum(r.accepted for r in results) > 0  # the converted draft agrees with its target
