"""A drafter is one module and one registration line: a test-only drafter, defined here and never
shipped, that ``specd devices`` lists, the settings accept, and an edge drafts with end to end."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from local_pool import local_pool

from common.sampling import SamplingParams
from common.settings import Settings
from common.wire import SamplingSpec
from edge_worker.backends.base import DraftBackend, DraftState, Proposal
from edge_worker.drafters import DraftContext, Drafter, register, unregister
from verifier_worker.engine import generate_target_only

pytestmark = pytest.mark.integration


class RepeatLast(DraftBackend):
    """Drafts the context's last token again, gamma times (no model: the draft's tokenizer only)."""

    name = "repeat_last"
    device = "cpu"

    def __init__(self, model: str) -> None:
        from common.models import load_tokenizer, vocab_fingerprint

        self.tokenizer = load_tokenizer(model)
        self.fingerprint, self.vocab_size = vocab_fingerprint(self.tokenizer), len(self.tokenizer)
        self.model_name, self.eos_token_ids = model, frozenset()

    def new_state(self) -> DraftState:
        return DraftState()

    def propose(self, state: DraftState, context: list[int], gamma: int, params: SamplingParams,
                seq: int, stop_token_ids: frozenset[int], max_support: int,
                cancel: threading.Event | None = None) -> Proposal:
        return Proposal([context[-1]] * gamma)  # greedy sessions only: no distributions


def build(ctx: DraftContext) -> DraftBackend:
    return RepeatLast(ctx.model)


@pytest.fixture
def repeat_last() -> Iterator[Drafter]:
    drafter = register(Drafter("repeat_last", "test only: repeats the last token", build))  # the one line
    yield drafter
    unregister(drafter.name)


def test_specd_devices_lists_a_registered_drafter(repeat_last, capsys, monkeypatch, tmp_path) -> None:
    from specd import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    assert cli.main(["devices", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeat_last"] == {"installed": True, "devices": [], "drafter": repeat_last.summary}
    with pytest.raises(ValueError, match=r"unknown draft backend 'repeat_lost'.*repeat_last"):
        Settings(edge={"backend": "repeat_lost"})


async def test_an_edge_drafts_with_a_registered_drafter(repeat_last, redis_url, tiny_pair) -> None:
    settings = Settings(redis={"url": redis_url, "key_prefix": "registry"},
                        models={"target": tiny_pair["target"], "draft": tiny_pair["draft"]},
                        verifier={"idle_block_ms": 20},
                        edge={"backend": "repeat_last", "verdict_timeout_s": 30, "gamma": 3})
    async with local_pool(settings, worker_id="v-registry") as (verifier, edge):
        assert isinstance(edge.backend, RepeatLast)
        prompt = edge.backend.tokenizer.encode("one two two two")
        result = await edge.generate(prompt, SamplingSpec(max_new_tokens=16))
        reference = generate_target_only(verifier.engine, prompt, SamplingParams(), frozenset(), 16)
        assert result.token_ids == reference and result.drafted > 0
