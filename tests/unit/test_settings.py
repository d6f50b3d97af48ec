"""Settings: TOML, then environment, then CLI; unknown or invalid keys name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("SPECD_"):
            monkeypatch.delenv(name)


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.edge.gamma is None and settings.redis.url == ""  # None: the draft's recommendation


def test_precedence_toml_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "settings.toml").write_text("[edge]\ngamma = 2\nmax_support = 16\n")
    assert load_settings().edge.gamma == 2
    monkeypatch.setenv("SPECD_EDGE__GAMMA", "6")
    settings = load_settings()
    assert settings.edge.gamma == 6 and settings.edge.max_support == 16
    assert load_settings({"edge": {"gamma": 3, "tenant": None}}).edge.gamma == 3


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text("[edge]\ngama = 2\n")
    with pytest.raises(ConfigError, match=r"edge\.gama"):
        load_settings()


def test_unknown_env_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECD_EDGE__GAMA", "2")
    with pytest.raises(ConfigError, match="SPECD_EDGE__GAMA"):
        load_settings()


def test_invalid_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECD_SAMPLING__TOP_P", "1.5")
    with pytest.raises(ConfigError, match=r"sampling\.top_p"):
        load_settings()
    monkeypatch.delenv("SPECD_SAMPLING__TOP_P")
    with pytest.raises(ConfigError, match=r"redis\.url"):
        load_settings({"redis": {"url": "http://nope"}})


def test_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match=r"limits\.max_gamma"):
        load_settings({"edge": {"gamma": 20}})


def test_explicit_config_file_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECD_CONFIG", "/nonexistent/specd.toml")
    with pytest.raises(ConfigError, match="SPECD_CONFIG"):
        load_settings()


def test_repository_settings_file_is_valid_and_matches_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    repo_file = Path(__file__).resolve().parents[2] / "settings.toml"
    monkeypatch.setenv("SPECD_CONFIG", str(repo_file))
    from common.settings import Settings

    assert load_settings().model_dump() == Settings.model_construct().model_dump()
