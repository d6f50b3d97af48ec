"""The real pair end to end: SmolLM2-135M-Instruct (named, from its GGUF file) as the target and its
shipped draft (some drafts accepted, most not), on Spec-Bench
questions through the chat template. Greedy speculative output equals the target's own greedy
output through Redis (`specd edge`, several sessions batched) and through `specd serve` with the
official openai client. Short outputs: the point is exactness on a real vocabulary, not speed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import REAL_TARGET, _free_port  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPECBENCH = ROOT.parent / "shared" / "data" / "specbench_questions.jsonl"
FALLBACK = ["What is the capital of France?", "Write a Python function that reverses a string.",
            "Explain photosynthesis in one sentence."]
TOKENS = 16


def _questions(count: int = 3) -> list[str]:
    """The first turn of Spec-Bench questions from different categories (or built-ins)."""
    if not SPECBENCH.exists():
        return FALLBACK[:count]
    seen: dict[str, str] = {}
    for line in SPECBENCH.read_text().splitlines():
        row = json.loads(line)
        seen.setdefault(row["category"], row["turns"][0])
    return list(seen.values())[:count]


def _env(pair: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECD_")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "SPECD_MODELS__TORCH_THREADS": "1", "SPECD_MODELS__TARGET": REAL_TARGET,
            "SPECD_MODELS__DRAFT": pair["draft"], "SPECD_SAMPLING__MAX_NEW_TOKENS": str(TOKENS),
            "SPECD_POOL__KV_BUDGET_TOKENS": "4096"}  # 180 MiB of KV (45 KiB/token): a shared machine


@pytest.fixture(scope="module")
def greedy(real_pair: dict[str, str]) -> Any:
    """The target's own greedy answer (token ids) to a chat-templated question."""
    from common.models import encode_prompt, load_causal_lm
    from common.sampling import SamplingParams
    from verifier_worker.engine import TargetEngine, generate_target_only

    target = load_causal_lm(REAL_TARGET)
    engine = TargetEngine(target.model, target.vocab_size)

    def answer(question: str, tokens: int = TOKENS) -> list[int]:
        prompt = encode_prompt(target.tokenizer, question, chat=True)
        return generate_target_only(engine, prompt, SamplingParams(0.0, 1.0, 0, 0),
                                    frozenset(target.eos_token_ids), tokens)

    answer.tokenizer = target.tokenizer  # type: ignore[attr-defined]
    return answer


@pytest.fixture(scope="module")
def verifier(redis_url: str, real_pair: dict[str, str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("real-logs") / "verifier.log"
    process = subprocess.Popen([sys.executable, "-m", "specd", "verifier", "--redis-url", redis_url,
                                "--log-format", "json"], env=_env(real_pair),
                               stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_edge_through_redis_equals_target_greedy(redis_url: str, real_pair: dict[str, str],
                                                 verifier: Any, greedy: Any) -> None:
    questions = _questions()
    args = [sys.executable, "-m", "specd", "edge", "--redis-url", redis_url, "--chat", "--events"]
    for question in questions:
        args += ["--prompt", question]
    done = subprocess.run(args, env=_env(real_pair), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {e["prompt"]: e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "result"}
    assert set(results) == set(questions)
    for question in questions:
        assert results[question]["token_ids"] == greedy(question), question
    drafted = sum(r["drafted"] for r in results.values())
    accepted = sum(r["accepted"] for r in results.values())
    assert drafted > 0 and 0 < accepted < drafted  # both kinds of verdict on the real vocabulary


@pytest.mark.timeout(900)  # the screenshot run ($SPECD_SERVE_SCREENSHOT) writes a longer answer
def test_serve_with_the_openai_client_equals_target_greedy(redis_url: str, real_pair: dict[str, str],
                                                          verifier: Any, greedy: Any, tmp_path: Path) -> None:
    from test_serve import _stop, _wait_ready

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "specd", "serve", "--redis-url", redis_url,
                               "--port", str(port), "--log-format", "json"], env=_env(real_pair),
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"))  # noqa: SIM115
    try:
        _wait_ready(f"http://127.0.0.1:{port}", [server, verifier], timeout_s=180)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        assert [m.id for m in client.models.list().data] == [REAL_TARGET]
        question = _questions(4)[3]  # another category than the edge test's
        expected = greedy.tokenizer.decode(greedy(question), skip_special_tokens=True)
        messages = [{"role": "user", "content": question}]
        whole = client.chat.completions.create(model=REAL_TARGET, messages=messages, max_tokens=TOKENS,
                                               temperature=0)
        assert whole.choices[0].message.content == expected and whole.usage.completion_tokens > 0
        stream = client.chat.completions.create(model=REAL_TARGET, messages=messages, max_tokens=TOKENS,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        if CHROMIUM:
            _web_page_answers(f"http://127.0.0.1:{port}/", greedy, tmp_path)
    finally:
        _stop(server)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WEB_QUESTION = "What is the capital of France, and what is it famous for?"


def _web_page_answers(url: str, greedy: Any, tmp_path: Path) -> None:
    """The web chat answers a real question in headless Chromium; the screenshot goes to
    $SPECD_SERVE_SCREENSHOT when set (docs/serve-web.png is made so)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    shot = Path(os.environ.get("SPECD_SERVE_SCREENSHOT", tmp_path / "serve-web.png"))
    tokens = int(os.environ.get("SPECD_SERVE_SCREENSHOT_TOKENS", TOKENS))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(  # a fresh --user-data-dir
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1100, "height": 640},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function(f"document.getElementById('model').textContent === '{REAL_TARGET}'")
            page.fill("#max-tokens", str(tokens))
            page.fill("#prompt", WEB_QUESTION)
            page.click("#send")
            page.wait_for_function("['done', 'error'].includes(document.getElementById('fig-status')"
                                   ".textContent)", timeout=600_000)
            answer = page.inner_text(".msg.assistant")
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    expected = greedy.tokenizer.decode(greedy(WEB_QUESTION, tokens), skip_special_tokens=True)
    assert answer.strip().startswith(expected.strip()) and "Paris" in answer
