"""Every failure a user can hit: one clear message naming the problem, a documented exit code.

Issue 15 (each item) and issue 12 finding 7 (settings that used to break only at run time).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import warnings
from pathlib import Path

import fakeredis
import numpy as np
import pytest
from honest import HonestBroker

from broker.reach import RedisUnavailable, ensure_reachable, redacted
from broker.streams import Broker, connect
from common.logs import LogSink
from common.models import ModelLoadError, forward_with_cache, load_causal_lm, resolve_model_path
from common.prompt_limits import prompt_problem
from common.settings import ConfigError, Settings, check_kv_budget, load_settings
from common.wire import ErrorCode, ErrorMessage, SamplingSpec, SessionOpen, decode, encode
from specd import cli, flags
from specd.failures import EXIT_CODES, report
from specd.prompts import PromptError, read_prompts


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("SPECD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SPECD_MODELS__TARGET", "bundled:target")  # the tiny pair, as everywhere in tests
    monkeypatch.setenv("SPECD_MODELS__DRAFT", "bundled:draft")
    monkeypatch.setattr("specd.cli.configure_logging", lambda *a, **k: None)  # keep pytest's streams


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- settings (issue 12, finding 7)

@pytest.mark.parametrize(("env", "value", "named"), [
    ("SPECD_REDIS__KEY_PREFIX", "a{b}", "redis.key_prefix"),
    ("SPECD_SAMPLING__MAX_NEW_TOKENS", "9000", "limits.max_new_tokens"),
    ("SPECD_LIMITS__MAX_GAMMA", "300000", "limits.max_gamma"),
    ("SPECD_EDGE__VERDICT_TIMEOUT_S", "inf", "edge.verdict_timeout_s"),
    ("SPECD_REDIS__SOCKET_TIMEOUT_S", "nan", "redis.socket_timeout_s"),
    ("SPECD_MODELS__TRUST_REMOTE_CODE", "yes", "models.trust_remote_code"),
    ("SPECD_TENANTS__OVERRIDES", '{"acme": {max_sessions: 4}', "SPECD_TENANTS__OVERRIDES"),
])
def test_setting_misuse_is_caught_at_start_up_naming_the_key(monkeypatch, env, value, named) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as caught:
        load_settings()
    assert "Traceback" not in str(caught.value) and len(str(caught.value).splitlines()) <= 3


def test_toml_values_are_strict_booleans(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text('[models]\ntrust_remote_code = "yes"\n')
    with pytest.raises(ConfigError, match=r"models\.trust_remote_code.*settings file"):
        load_settings()
    (tmp_path / "settings.toml").write_text("[models]\ntrust_remote_code = true\n")
    assert load_settings().models.trust_remote_code is True


def test_environment_booleans_take_true_false_1_0(monkeypatch) -> None:
    monkeypatch.setenv("SPECD_EDGE__DRAFT_AHEAD", "true")
    monkeypatch.setenv("SPECD_EDGE__ADAPTIVE_GAMMA", "0")
    settings = load_settings()
    assert settings.edge.draft_ahead is True and settings.edge.adaptive_gamma is False


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text("[edge]\ngamma = = 3\n")
    with pytest.raises(ConfigError, match=r"settings\.toml: not valid TOML.*line 2"):
        load_settings()


def test_a_bad_value_is_blamed_on_where_it_came_from(monkeypatch, tmp_path: Path) -> None:
    """SPECD_EDGE__GAMMA=-1 used to be blamed on settings.toml."""
    (tmp_path / "settings.toml").write_text("[edge]\ngamma = 2\n")
    monkeypatch.setenv("SPECD_EDGE__GAMMA", "-1")
    with pytest.raises(ConfigError, match=r"edge\.gamma: .* \(from environment SPECD_EDGE__GAMMA\)"):
        load_settings()
    monkeypatch.delenv("SPECD_EDGE__GAMMA")
    with pytest.raises(ConfigError, match=r"edge\.gamma: .* \(from --gamma\)"):
        cli.settings_from_args(cli.build_parser().parse_args(["generate", "--prompt", "x", "--gamma", "-2"]))
    (tmp_path / "settings.toml").write_text("[edge]\ngamma = -3\n")
    with pytest.raises(ConfigError, match=r"edge\.gamma: .* \(from settings file settings\.toml\)"):
        load_settings()


def test_kv_budget_beyond_the_memory_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"pool\.kv_budget_tokens \(1000000\).*at most 1000"):
        check_kv_budget(1_000_000, 1024, 1000 * 1024, "cpu")
    check_kv_budget(1000, 1024, 1000 * 1024, "cpu")  # fits exactly
    check_kv_budget(10**12, 1024, None, "mps")  # unknown memory: not refused


def test_kv_budget_larger_than_the_machine_fails_before_allocating(tiny_pair) -> None:
    from specd.runtime import target_engine

    target = load_causal_lm(tiny_pair["target"])
    with pytest.raises(ConfigError, match=r"pool\.kv_budget_tokens"):
        target_engine(target.model, target.vocab_size, 10**13)


def test_max_new_tokens_beyond_the_models_context_names_the_key(tiny_pair) -> None:
    from specd.runtime import build_edge

    settings = Settings(models={"draft": tiny_pair["draft"], "target": tiny_pair["target"]},
                        sampling={"max_new_tokens": 600})  # the tiny models have 512 positions
    broker = Broker(fakeredis.FakeAsyncRedis())
    with pytest.raises(ConfigError, match=r"sampling\.max_new_tokens \(600\).*models\.draft.*at most 511"):
        build_edge(settings, broker)


def test_metrics_bind_to_loopback_by_default() -> None:
    assert Settings().metrics.host == "127.0.0.1"


# ---------------------------------------------------------------- the command line

def help_of(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


COMMANDS = ["demo", "verifier", "pool", "edge", "generate", "devices", "loadtest", "logs", "train-pair",
            "pair-report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_defaults_and_exit_codes(capsys, command) -> None:
    text = help_of(capsys, command)
    assert "exit codes:" in text and "130" in text and "interrupted" in text
    assert "default" in text


def test_every_settings_flag_shows_its_key_and_default(capsys) -> None:
    text = " ".join(help_of(capsys, "generate").split())
    for group in ("common", "target", "draft"):
        for flag in flags.SETTING_FLAGS[group]:
            section, key = flag.setting.split(".")
            default = Settings.model_fields[section].annotation.model_fields[key].default
            shown = flags._default_text(default)
            assert f"[{flag.setting}; default: {shown}]" in text, flag.setting


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("specd ")


def test_pair_tools_take_their_flags_and_write_nowhere_surprising(capsys) -> None:
    text = help_of(capsys, "train-pair")
    assert "--target-steps" in text and "(default: specd-pair)" in text
    assert "--rounds" in help_of(capsys, "pair-report")
    args = cli.build_parser().parse_args(["train-pair", "--out", "x", "--target-steps", "3"])
    assert args.out == "x" and args.target_steps == 3
    args = cli.build_parser().parse_args(["pair-report"])
    assert Path(args.pair).is_absolute() and (Path(args.pair) / "target" / "config.json").is_file()


def test_a_bad_flag_is_one_line_with_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--edges", "0"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "--edges: must be at least 1" in err


def test_verifier_and_edge_help_do_not_promise_an_embedded_redis(capsys) -> None:
    for command in ("verifier", "edge"):
        text = " ".join(help_of(capsys, command).split())
        assert "required" in text and "Empty: demo, generate" not in text
    assert cli.main(["edge", "--prompt", "x"]) == 2
    assert "redis.url is not set" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["pool", "status"], ["logs"], ["verifier"], ["edge", "--prompt", "x"],
                                     ["generate", "--prompt", "x"]])
def test_unreachable_redis_gives_up_with_one_line_and_exit_3(monkeypatch, capsys, command) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    monkeypatch.setenv("SPECD_REDIS__STARTUP_WAIT_S", "0.5")
    started = time.monotonic()
    assert cli.main([*command, "--redis-url", url]) == 3
    err = capsys.readouterr().err
    assert time.monotonic() - started < 30
    assert f"cannot reach Redis at {url}" in err and "Traceback" not in err and err.count("\n") == 1


async def test_ensure_reachable_is_bounded_and_hides_passwords() -> None:
    url = f"redis://:secret@127.0.0.1:{closed_port()}/0"
    client = connect(url, 1.0)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1") as caught:
        await ensure_reachable(client, url, 0.3)
    await client.aclose()
    assert time.monotonic() - started < 5 and "secret" not in str(caught.value)
    assert redacted("redis://u:p@h:1/0") == "redis://u:***@h:1/0"


def test_a_missing_model_folder_says_so(capsys) -> None:
    with pytest.raises(ModelLoadError, match="model folder /nonexistent/model does not exist"):
        resolve_model_path("/nonexistent/model")
    code = cli.main(["generate", "--prompt", "x", "--mode", "target", "--target-model", "/nonexistent/model"])
    err = capsys.readouterr().err
    assert code == 2 and err == "specd generate: model folder /nonexistent/model does not exist\n"


def test_a_missing_draft_folder_fails_before_redis_or_the_target_start(capsys, monkeypatch) -> None:
    """Issue 21, item 12: `generate --draft-model ./nope` used to start a Redis, load the target,
    and only then fail; the names are checked first."""
    from specd import generation as generate

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("started before the model names were checked")

    monkeypatch.setattr(generate, "EmbeddedRedis", refuse)
    monkeypatch.setattr(generate, "build_verifier", refuse)
    assert cli.main(["generate", "--prompt", "x", "--draft-model", "./nope"]) == 2
    assert capsys.readouterr().err == "specd generate: model folder ./nope does not exist\n"


def test_a_folder_without_a_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_model_path(str(tmp_path))


def test_an_internal_error_is_one_line_unless_debug(capsys) -> None:
    try:
        raise TypeError("boom")
    except TypeError as exc:
        bug = exc
    assert report("generate", bug, debug=False) == 70
    assert capsys.readouterr().err.count("\n") == 1
    assert report("generate", bug, debug=True) == 70
    assert "Traceback" in capsys.readouterr().err
    assert set(EXIT_CODES) == {0, 1, 2, 3, 70, 130}


# ---------------------------------------------------------------- prompts

def test_prompts_files_name_themselves(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PromptError, match=r"bad\.txt: not UTF-8"):
        read_prompts(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match=r"empty\.txt: no prompts in it"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(PromptError, match=r"missing\.txt: no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_empty_prompt_is_refused_in_every_mode(capsys) -> None:
    for mode in ("speculative", "target", "draft"):
        assert cli.main(["generate", "--prompt", "", "--mode", mode]) == 2
        assert "--prompt is empty" in capsys.readouterr().err


def test_prompt_limits() -> None:
    assert "empty" in prompt_problem(0, 8, 1024)
    assert prompt_problem(1000, 24, 1024) == ""
    assert "lower max_new_tokens to 24" in prompt_problem(1000, 64, 1024)
    assert "shorten the prompt" in prompt_problem(5000, 64, 1024)
    assert prompt_problem(5000, 64, 0) == ""  # context unknown (e.g. the replay backend)


def test_over_long_prompt_in_target_mode(tiny_pair, capsys) -> None:
    code = cli.main(["generate", "--mode", "target", "--target-model", tiny_pair["target"],
                     "--prompt", "x " * 600])
    assert code == 2 and "positions, models.target has 512" in capsys.readouterr().err


async def test_edge_refuses_empty_and_over_long_prompts_before_sending(tiny_pair) -> None:
    from edge_worker.client import PromptRejected
    from specd.runtime import build_edge
    from specd.workers import PromptJob, run_edge_jobs, sampling_spec

    settings = Settings(models={"draft": tiny_pair["draft"], "target": tiny_pair["target"]})
    redis = fakeredis.FakeAsyncRedis()
    client = build_edge(settings, Broker(redis))
    spec = sampling_spec(settings, client.backend.eos_token_ids)
    for prompt_ids, code in (([], ErrorCode.MALFORMED), ([5] * 5000, ErrorCode.LIMIT_EXCEEDED)):
        with pytest.raises(PromptRejected) as caught:
            await client.generate(prompt_ids, spec)
        assert caught.value.code == code
    assert await redis.keys("*") == []  # nothing was sent
    events: list[dict] = []
    results = await run_edge_jobs(settings, client, [PromptJob("x " * 600)], events.append)
    assert results == [None] and events[0]["event"] == "error" and events[0]["code"] == "limit_exceeded"


async def test_verifier_refuses_an_over_long_prompt_with_a_typed_error(tiny_pair) -> None:
    from verifier_worker.engine import TargetEngine
    from verifier_worker.worker import VerifierWorker

    target = load_causal_lm(tiny_pair["target"])
    broker = HonestBroker(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), prefix="t")
    worker = VerifierWorker(Settings(verifier={"idle_block_ms": 1}, pool={"kv_budget_tokens": 4096}),
                            TargetEngine(target.model, target.vocab_size, 4096), broker, "tiny",
                            target.fingerprint, worker_id="w1")
    await worker.startup()
    try:
        for sid, length in (("long", 500), ("fine", 4)):
            message = SessionOpen(sid, np.full(length, 5, np.uint32), SamplingSpec(max_new_tokens=16),
                                  "draft", target.fingerprint)
            await broker.open_session(sid, encode(message))
        for _ in range(3):
            await worker.iterate()
        verdicts = [decode(e.payload) for e in await broker.read_verdicts("long", "0-0", block_ms=1)]
        assert isinstance(verdicts[0], ErrorMessage) and verdicts[0].code == ErrorCode.LIMIT_EXCEEDED
        assert "516 positions, the target model has 512" in verdicts[0].message
        assert "fine" in worker.sessions and "long" not in worker.sessions
    finally:
        await broker.close()


# ---------------------------------------------------------------- logs

def test_an_empty_log_sink_is_still_a_sink() -> None:
    assert LogSink() and len(LogSink()) == 0


async def test_worker_lines_reach_the_log_stream_from_an_empty_sink() -> None:
    """The sink starts empty; its drain must start anyway (it used to be falsy: no lines ever)."""
    from specd import workers

    sink = LogSink()
    redis = fakeredis.FakeAsyncRedis()
    broker = Broker(redis, prefix="lg")
    settings = Settings(log={"redis_stream": True})
    original = workers.log_sink
    workers.log_sink = lambda: sink  # type: ignore[assignment]
    try:
        async with workers.worker_services(settings, broker, None):
            sink.put(json.dumps({"event": "verify.round", "session_id": "s1"}))
            for _ in range(50):
                if await redis.xlen("lg:logs"):
                    break
                await asyncio.sleep(0.05)
    finally:
        workers.log_sink = original  # type: ignore[assignment]
    assert await redis.xlen("lg:logs") == 1


# ---------------------------------------------------------------- transformers API

def test_cached_forward_uses_the_current_transformers_argument(tiny_pair) -> None:
    import torch

    model = load_causal_lm(tiny_pair["draft"]).model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the removed-in-5.40 argument warns: it must not be used
        out, cache = forward_with_cache(model, None, input_ids=torch.tensor([[1, 2, 3]]))
        out2, cache = forward_with_cache(model, cache, input_ids=torch.tensor([[4]]))
    assert cache.get_seq_length() == 4 and out2.logits.shape[1] == 1 and out.logits.shape[1] == 3


async def test_a_failed_edge_session_line_names_its_session_and_its_code_once(capsys) -> None:
    """Issue 21, item 10: `[] error internal: internal: ...` became `[a1b2c3d4] error internal: ...`."""
    from types import SimpleNamespace

    from edge_worker.client import SessionFailed
    from specd.workers import PromptJob, _printer, run_edge_jobs

    class FailingClient:
        backend = SimpleNamespace(tokenizer=SimpleNamespace(encode=lambda text: [1, 2]), eos_token_ids=[0])

        def session_id(self) -> str:
            return "default.a1b2c3d4e5f6"

        async def generate(self, *_args: object) -> None:
            raise SessionFailed(ErrorCode.INTERNAL, "no verdict for seq 0 within 60.0s")

    results = await run_edge_jobs(Settings(), FailingClient(), [PromptJob("x")], _printer(False))  # type: ignore[arg-type]
    assert results == [None]
    assert capsys.readouterr().out == "[a1b2c3d4] error internal: no verdict for seq 0 within 60.0s\n"


def test_one_thread_policy_for_every_generate_mode(monkeypatch) -> None:
    """Issue 21, item 8: 0 (the default) is one torch thread in every mode, --torch-threads N is N."""
    from specd import generation as generate

    applied: list[int] = []
    monkeypatch.setattr(generate, "set_torch_threads", applied.append)
    assert generate.thread_policy(load_settings({})) == 1
    assert generate.thread_policy(load_settings({"models": {"torch_threads": 3}})) == 3
    assert applied == [1, 3]


def test_gamma_zero_is_refused_with_what_to_do_instead(capsys) -> None:
    """Issue 21, item 12: `--gamma 0` ran a "speculative" session that never drafted."""
    assert cli.main(["generate", "--prompt", "x", "--gamma", "0"]) == 2
    err = capsys.readouterr().err
    assert "edge.gamma: must be at least 1" in err and "--mode target" in err and "(from --gamma)" in err
