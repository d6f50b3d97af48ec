"""The Python API (``import specd``): the README's example as written, greedy output equal to the
target's, the client's clean-up (no redis-server left), on the embedded default (real
redis-server, in-process verifier) with the bundled pair."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

import specd

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LEAN = {"models": {"torch_threads": 1}, "pool": {"kv_budget_tokens": 16384}}  # a 128 MiB KV arena


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def _redis_children() -> set[int]:
    """redis-server processes whose parent is this process (the embedded Redis)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid() and b"redis-server" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found


def test_readme_example_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECD_MODELS__TORCH_THREADS", "1")
    monkeypatch.setenv("SPECD_POOL__KV_BUDGET_TOKENS", "16384")
    out = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(_readme_example(), "README.md", "exec"), namespace)
    calls = [line.split() for line in out.getvalue().splitlines()[-2:]]  # the client's two calls
    for finish, tokens, logprob in calls:
        assert finish in ("length", "stop") and 1 <= int(tokens) <= 16 and float(logprob) <= 0
    result = namespace["result"]
    assert isinstance(result, specd.Result) and len(result.logprobs or []) == result.tokens
    assert namespace["chunk"].token_ids or namespace["chunk"].text  # type: ignore[attr-defined]
    assert not _redis_children()  # every client it started is closed


def test_greedy_result_is_the_targets_and_carries_the_generate_json_fields() -> None:
    from common.models import load_causal_lm
    from common.sampling import SamplingParams
    from verifier_worker.engine import TargetEngine, generate_target_only

    with specd.Client(settings=LEAN) as client:
        children = _redis_children()
        assert len(children) == 1 and client.embedded  # the embedded Redis, a child of ours
        result = client.generate("def fibonacci(n):\n", max_new_tokens=20, temperature=0)
        stream = client.stream("def fibonacci(n):\n", max_new_tokens=20, temperature=0)
        chunks = list(stream)
        cancelled = client.stream("class Stack:\n", max_new_tokens=400)
        next(cancelled)
        cancelled.close()  # mid-session: the session is closed on the verifier
        again = client.generate("import os\n", max_new_tokens=8, temperature=0)
    assert not _redis_children() and all(not Path(f"/proc/{pid}").exists() for pid in children)
    target = load_causal_lm("bundled:target")
    reference = generate_target_only(TargetEngine(target.model, target.vocab_size, 4096),
                                     target.tokenizer.encode("def fibonacci(n):\n"), SamplingParams(),
                                     frozenset(target.eos_token_ids), 20)
    assert result.token_ids == reference and stream.result is not None
    assert stream.result.token_ids == reference
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == reference
    assert again.tokens == 8
    fields = result.to_dict()
    for name in ("token_ids", "text", "rounds", "drafted", "accepted", "acceptance_rate",
                 "target_forward_passes", "mean_accepted_length", "tokens_per_s", "draft_ms", "queue_ms",
                 "verify_ms", "transport_ms", "finish_reason", "mode", "redis"):
        assert name in fields
    assert fields["mode"] == "speculative" and fields["redis"] == "embedded"
    assert result.target_forward_passes == result.rounds >= 1
    with pytest.raises(RuntimeError):
        client.generate("x", max_new_tokens=2)  # closed
