"""Draft backends: OpenVINO and ONNX Runtime GenAI against torch, conversion caching, devices.

Backend tests run on the CPU with the tiny models; they skip (with the reason) only when the
backend's package is not installed. Converted models live in one folder per test session
(``edge_cache``), shared with tests/integration/test_edge_backends.py.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch

from common.sampling import SamplingParams
from edge_worker import devices, drafters
from edge_worker.backends import create_backend
from edge_worker.devices import (
    BackendUnavailableError,
    DeviceUnavailableError,
    candidates,
    resolve_device,
)

ATOL = 1e-4
"""f32 logits of every backend agree with torch's to this (measured: ~2e-6 on the tiny models)."""
PACKAGES = {"openvino": "openvino", "genai": "onnxruntime_genai"}
SEQUENCE = [3, 17, 42, 99, 7, 250, 11, 64, 5, 123]


@pytest.fixture(scope="session")
def edge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion cache per test session (the integration tests use the same folder)."""
    path = tmp_path_factory.getbasetemp() / "edge-convert-cache"
    path.mkdir(exist_ok=True)
    return path


def needs(kind: str) -> None:
    if kind in PACKAGES:
        pytest.importorskip(PACKAGES[kind], reason=f"{kind} backend not installed "
                            f"({drafters.get(kind).install_hint})")


@pytest.fixture(scope="session")
def torch_draft(tiny_pair):
    return create_backend("torch", tiny_pair["draft"])


@pytest.fixture(scope="session", params=["openvino", "genai"])
def other_draft(request, tiny_pair, edge_cache):
    needs(request.param)
    return create_backend(request.param, tiny_pair["draft"], cache_dir=str(edge_cache))


def test_logits_match_torch_through_feeds_and_rollbacks(torch_draft, other_draft) -> None:
    ours, theirs = torch_draft.new_state(), other_draft.new_state()
    for feed in (SEQUENCE[:4], SEQUENCE[4:5], SEQUENCE[5:8]):
        expected = torch_draft._feed(ours, feed)
        assert torch.allclose(other_draft._feed(theirs, feed), expected, atol=ATOL)
    for state, backend in ((ours, torch_draft), (theirs, other_draft)):  # a rejection: back to 5
        backend._rollback(state, [*SEQUENCE[:5], 1])
        assert state.tokens == SEQUENCE[:5]
    expected = torch_draft._feed(ours, [SEQUENCE[8], SEQUENCE[9]])
    assert torch.allclose(other_draft._feed(theirs, [SEQUENCE[8], SEQUENCE[9]]), expected, atol=ATOL)
    other_draft.release(theirs)


def test_proposals_match_torch_greedy_and_sampled(torch_draft, other_draft) -> None:
    assert (other_draft.vocab_size, other_draft.fingerprint, other_draft.eos_token_ids) == (
        torch_draft.vocab_size, torch_draft.fingerprint, torch_draft.eos_token_ids)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, top_k=0, seed=7)
    ours, theirs = torch_draft.new_state(), other_draft.new_state()
    for seq, (context, params) in enumerate([(SEQUENCE[:4], SamplingParams()),
                                             (SEQUENCE[:6], sampled), (SEQUENCE[:3], sampled)]):
        expected = torch_draft.propose(ours, context, 5, params, seq, frozenset(), 32)
        got = other_draft.propose(theirs, context, 5, params, seq, frozenset(), 32)
        assert got.token_ids == expected.token_ids
        assert got.support_sizes == expected.support_sizes
        for ids, probs, want_ids, want_probs in zip(got.support_ids, got.support_probs,
                                                    expected.support_ids, expected.support_probs,
                                                    strict=True):
            assert (ids == want_ids).all()
            assert abs(probs - want_probs).max() < ATOL


def test_cancel_stops_drafting_and_guess_is_greedy(other_draft) -> None:
    state, cancel = other_draft.new_state(), threading.Event()
    cancel.set()
    cut = other_draft.propose(state, SEQUENCE[:4], 6, SamplingParams(), 0, frozenset(), 8, cancel)
    assert len(cut.token_ids) == 1
    full = other_draft.propose(state, SEQUENCE[:4], 3, SamplingParams(), 0, frozenset(), 8)
    assert other_draft.guess_next(state, SEQUENCE[:4]) == full.token_ids[0]


def test_second_start_reuses_the_converted_model(tiny_pair, edge_cache, other_draft) -> None:
    kind = other_draft.name
    again = create_backend(kind, tiny_pair["draft"], cache_dir=str(edge_cache))
    folder = again.ir_folder if kind == "openvino" else again.model_folder
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    third = create_backend(kind, tiny_pair["draft"], cache_dir=str(edge_cache))
    assert not again.converted and not third.converted  # converted once, by the first start
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert len([p for p in (edge_cache / kind).iterdir() if not p.name.startswith(".")]) >= 1


def test_conversion_runs_once_per_cache_folder(tiny_pair, tmp_path, monkeypatch) -> None:
    needs("openvino")
    from edge_worker.backends import openvino_backend

    calls = []
    real = openvino_backend._convert
    monkeypatch.setattr(openvino_backend, "_convert", lambda *a: (calls.append(a), real(*a)))
    first = create_backend("openvino", tiny_pair["draft"], cache_dir=str(tmp_path))
    second = create_backend("openvino", tiny_pair["draft"], cache_dir=str(tmp_path))
    assert len(calls) == 1 and first.converted and not second.converted
    assert first.ir_folder == second.ir_folder and (first.ir_folder / "model.xml").is_file()


def test_changed_weights_or_precision_change_the_key(tiny_pair, tmp_path) -> None:
    from edge_worker.backends.convert import cache_key

    folder = Path(tiny_pair["draft"])
    key = cache_key(folder, "f32", "v1")
    assert key == cache_key(folder, "f32", "v1")
    assert key != cache_key(folder, "bf16", "v1") != cache_key(folder, "f32", "v2")
    copy = tmp_path / "draft"
    copy.mkdir()
    for item in folder.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b" ")
    assert cache_key(copy, "f32", "v1") != key


def test_openvino_npu_falls_back_to_cpu_and_reports_it(tiny_pair, edge_cache) -> None:
    needs("openvino")
    if "NPU" in devices.available_devices("openvino"):
        pytest.skip("this machine has an NPU")
    backend = create_backend("openvino", tiny_pair["draft"], device="npu", device_fallback="fallback",
                             cache_dir=str(edge_cache))
    assert backend.device == "CPU"
    with pytest.raises(DeviceUnavailableError, match=r"npu.*fallback"):
        create_backend("openvino", tiny_pair["draft"], device="npu", device_fallback="fail",
                       cache_dir=str(edge_cache))


def test_resolve_device_per_backend() -> None:
    assert resolve_device("torch", "auto", available=["cpu"]).used == "cpu"
    assert resolve_device("torch", "auto", available=["cpu", "cuda:0"]).used == "cuda:0"
    assert resolve_device("torch", "cuda:1", available=["cpu", "cuda:0", "cuda:1"]).used == "cuda:1"
    assert resolve_device("openvino", "gpu.1", available=["CPU", "GPU.0", "GPU.1"]).used == "GPU.1"
    assert resolve_device("openvino", "npu", available=["CPU", "NPU"]).used == "NPU"
    assert resolve_device("genai", "gpu", available=["cpu", "dml"]).used == "dml"
    choice = resolve_device("genai", "npu", "fallback", available=["cpu"])
    assert (choice.used, choice.fell_back) == ("cpu", True)
    with pytest.raises(DeviceUnavailableError, match=r"available: CPU"):
        resolve_device("openvino", "npu", "fail", available=["CPU"])
    with pytest.raises(DeviceUnavailableError):
        resolve_device("torch", "cuda", "fail", available=["cpu"])
    assert candidates("openvino", "cuda") == []  # OpenVINO has no CUDA device


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(devices, "installed", lambda backend: backend == "torch")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'specd\[openvino\]'"):
        devices.require("openvino")
    report = devices.describe_all()
    assert report["genai"] == {"installed": False, "devices": [], "hint": "pip install 'specd[genai]'"}
    assert report["torch"]["installed"] and "cpu" in report["torch"]["devices"]


def test_int8_compression_keeps_stdout_clean(capsys, monkeypatch) -> None:
    """NNCF logs through a handler bound to stdout at import and draws a progress bar there;
    `specd generate --json` owns stdout, so both must land on stderr. A stand-in module plays NNCF
    (the real one is an optional extra): it binds its handler at import, as NNCF does."""
    import logging
    import sys
    import types

    from edge_worker.backends import openvino_backend

    def fake_import() -> types.SimpleNamespace:
        logger = logging.getLogger("nncf")
        logger.handlers = [logging.StreamHandler(sys.stdout)]
        logger.propagate = False

        def compress_weights(model: object) -> str:
            logger.warning("Statistics of the bitwidth distribution")
            print("Applying Weight Compression 100%")
            return f"compressed {model}"

        return types.SimpleNamespace(compress_weights=compress_weights)

    monkeypatch.setitem(sys.modules, "nncf", fake_import())
    try:
        assert openvino_backend._compress_int8("ir") == "compressed ir"
    finally:
        logging.getLogger("nncf").handlers = []
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bitwidth" in captured.err and "Weight Compression" in captured.err


def test_specd_devices_lists_every_backend(capsys, monkeypatch, tmp_path) -> None:
    from specd import cli
    from specd.cli import main

    monkeypatch.chdir(tmp_path)
    # main() would point structlog at the captured stdout, which is closed after this test.
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    assert main(["devices", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"torch", "feature", "openvino", "genai", "replay", "prompt_lookup", "router"}
    assert "n-gram" in report["prompt_lookup"]["drafter"] and "edge.drafts" in report["router"]["drafter"]
    assert report["torch"]["auto"] in report["torch"]["devices"]
    if report["openvino"]["installed"]:
        assert "CPU" in report["openvino"]["devices"]
    if report["genai"]["installed"]:
        assert "cpu" in report["genai"]["devices"]
    assert main(["devices"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("torch") and "openvino" in text and "genai" in text


def test_cli_fails_clearly_when_the_device_is_missing(capsys, monkeypatch, tmp_path, tiny_pair) -> None:
    needs("openvino")
    from specd import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)
    without_npu = dataclasses.replace(drafters.get("openvino"), devices=lambda: ["CPU"])
    monkeypatch.setitem(drafters.REGISTRY, "openvino", without_npu)  # as on a machine without NPU
    code = cli.main(["generate", "--mode", "draft", "--prompt", "x", "--draft-model", tiny_pair["draft"],
                     "--backend", "openvino", "--device", "npu", "--device-fallback", "fail"])
    assert code == 2
    assert "edge.device='npu' is not available to the openvino backend" in capsys.readouterr().err
