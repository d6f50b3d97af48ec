"""Model loading through the Hugging Face path, and the tokenizer compatibility check."""

from __future__ import annotations

import pytest
import tiny_models

from common.models import (
    ModelLoadError,
    TokenizerMismatchError,
    check_tokenizers_compatible,
    load_causal_lm,
    resolve_model_path,
)


def test_loads_a_save_pretrained_folder_like_a_hub_id(tiny_pair) -> None:
    loaded = load_causal_lm(tiny_pair["target"], dtype="float32", device="cpu")
    assert loaded.vocab_size == len(loaded.tokenizer)
    assert loaded.tokenizer.eos_token_id in loaded.eos_token_ids
    assert not loaded.model.training and len(loaded.fingerprint) == 32


def test_missing_model_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_causal_lm("no-such-org/no-such-model")


def test_bundled_names_resolve_or_fail_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import common.models as models

    monkeypatch.setattr(models, "BUNDLED_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="bundled:target"):
        resolve_model_path("bundled:target")
    assert resolve_model_path("org/name") == "org/name"


def test_tokenizer_mismatch_names_both_models(tiny_pair, tmp_path) -> None:
    other_tok = tiny_models.build_tokenizer(corpus=tiny_models.OTHER_CORPUS)
    other = tiny_models.save(tiny_models.random_model(other_tok, 5, 32, 1), other_tok, tmp_path / "other")
    target = load_causal_lm(tiny_pair["target"])
    check_tokenizers_compatible(load_causal_lm(tiny_pair["draft"]), target)  # same vocabulary: fine
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers_compatible(load_causal_lm(str(other)), target)
    assert str(other) in str(info.value) and tiny_pair["target"] in str(info.value)


def test_an_unreachable_hub_fails_at_once_or_uses_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21, item 12: a hub id on an offline machine retried for ~56 s, each warning twice."""
    import time

    from huggingface_hub import constants

    import common.models as models
    from specd import cli

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")  # refused at once, network or not
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("specd.cli.configure_logging", lambda *args, **kwargs: None)
    models._hub_unreachable.cache_clear()
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"'some-org/some-model'.*not in the local cache"):
        models.hub_options("some-org/some-model")
    assert cli.main(["generate", "--mode", "target", "--target-model", "some-org/some-model",
                     "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 20 and len(err.strip().splitlines()) == 1, err
    assert "download it once with network access" in err
    snapshot = tmp_path / "models--some-org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--some-org--cached" / "refs").mkdir()
    (tmp_path / "models--some-org--cached" / "refs" / "main").write_text("abc123")
    assert models.hub_options("some-org/cached") == {"local_files_only": True}
    models._hub_unreachable.cache_clear()
