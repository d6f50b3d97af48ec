"""Settings reach child processes one way (``common.procs.child_env``): every draft flag that
``specd demo`` accepts reaches its edges (the demo used to forward 11 of 23 by hand)."""

from __future__ import annotations

import contextlib
import io
import os

import pytest

from common.procs import child_env
from common.settings import load_settings
from specd.cli import build_parser, settings_from_args
from specd.flags import SETTING_FLAGS

DRAFT_FLAGS = {  # a value other than the default for every flag of the demo's draft group
    "--draft-model": "some/draft", "--backend": "prompt_lookup", "--device": "auto",
    "--device-fallback": "fail", "--precision": "f16", "--draft-cache-dir": "/tmp/specd-cache",
    "--gamma": "5", "--adaptive-gamma": None, "--gamma-min": "2", "--gamma-max": "7", "--draft-ahead": None,
    "--draft-confidence": "0.45", "--draft-open-confidence": "0.35",
    "--max-support": "32", "--tenant": "acme", "--temperature": "0.7", "--top-p": "0.9", "--top-k": "40",
    "--seed": "11", "--max-new-tokens": "99", "--replay-file": "/tmp/replay.json",
    "--replay-acceptance": "0.5", "--network-delay-ms": "3", "--network-jitter-ms": "1",
    "--multiplex-verdicts": None,
}


def test_the_table_covers_every_draft_flag() -> None:
    assert set(DRAFT_FLAGS) == {spec.flag for spec in SETTING_FLAGS["draft"]}


def test_every_demo_draft_flag_reaches_the_children(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no settings.toml
    for name in [k for k in os.environ if k.upper().startswith("SPECD_")]:
        monkeypatch.delenv(name)
    argv = ["demo"] + [part for flag, value in DRAFT_FLAGS.items() for part in (flag, value) if part]
    parent = settings_from_args(build_parser().parse_args(argv))
    env = child_env(parent, "redis://127.0.0.1:1/0")
    with monkeypatch.context() as child:
        for name, value in env.items():
            child.setenv(name, value)
        seen = load_settings()
    for spec in SETTING_FLAGS["draft"]:
        section, key = spec.setting.split(".")
        expected = getattr(getattr(parent, section), key)
        assert getattr(getattr(seen, section), key) == expected, spec.flag
        assert expected != getattr(getattr(type(parent)(), section), key), spec.flag  # the table's job
    assert seen.redis.url == "redis://127.0.0.1:1/0" and seen.log.format == "json"


def test_an_unset_gamma_stays_unset_so_children_take_the_drafts_choice(monkeypatch, tmp_path) -> None:
    from specd.runtime import draft_gamma

    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.upper().startswith("SPECD_")]:
        monkeypatch.delenv(name)
    parent = settings_from_args(build_parser().parse_args(["demo"]))
    env = child_env(parent, "redis://127.0.0.1:1/0")
    assert "SPECD_EDGE__GAMMA" not in env
    with monkeypatch.context() as child:
        for name, value in env.items():
            child.setenv(name, value)
        assert draft_gamma(load_settings()) == draft_gamma(parent) == 8  # smollm2-135m-int4's


@pytest.mark.parametrize("flag", ["--draft-ahead", "--adaptive-gamma", "--multiplex-verdicts"])
def test_a_boolean_flag_survives_the_environment(flag, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    parent = settings_from_args(build_parser().parse_args(["demo", flag]))
    env = child_env(parent, "redis://127.0.0.1:1/0")
    assert env[f"SPECD_EDGE__{flag[2:].replace('-', '_').upper()}"] == "true"


class _Exited:
    """A child process that has already exited, printing nothing."""

    returncode = 0

    def __init__(self) -> None:
        async def nothing():
            return
            yield

        self.stdout = nothing()

    async def wait(self) -> int:
        return 0

    def terminate(self) -> None:
        pass


async def test_the_demo_starts_its_workers_with_every_setting(monkeypatch, tmp_path) -> None:
    from specd import demo

    @contextlib.asynccontextmanager
    async def embedded(settings):
        yield "redis://:secret@127.0.0.1:1/0", True

    async def healthy(*args, **kwargs) -> None:
        return None

    started: list[tuple[list[str], dict[str, str]]] = []

    async def spawn(*argv, env, **kwargs):
        started.append((list(argv), env))
        return _Exited()

    monkeypatch.setattr(demo, "redis_url_for", embedded)
    monkeypatch.setattr(demo, "_wait_healthy", healthy)
    monkeypatch.setattr(demo.asyncio, "create_subprocess_exec", spawn)
    monkeypatch.chdir(tmp_path)
    argv = ["demo"] + [part for flag, value in DRAFT_FLAGS.items() for part in (flag, value) if part]
    settings = settings_from_args(build_parser().parse_args(argv))
    await demo.run_demo(settings, 2, 1, ["x"], tmp_path, out=io.StringIO())
    expected = child_env(settings, "redis://:secret@127.0.0.1:1/0")
    assert len(started) == 3  # the verifier and two edges
    for command, env in started:
        assert env == expected
        assert not any("secret" in part for part in command)  # the password never on a command line
