"""OpenVINO draft backend (CPU, GPU, NPU): a stateless IR with explicit past keys and values.

The Hugging Face model is converted once with ``openvino.convert_model`` straight from torch (no
optimum): a thin wrapper takes ``input_ids``, ``position_ids``, a 4D additive attention mask and
the past keys/values as plain tensors, and returns the logits and the new keys/values. The past
stays on the edge as numpy arrays [1, kv_heads, T, head_dim] per layer, so rolling back after a
rejection is a slice. The IR is cached on disk (see ``convert.py``) and reused on the next start.

OpenVINO's CPU plugin pays for every new input shape (measured 2.5x slower per step when the past
grows by one each call), so the past is fed zero-padded to a multiple of ``PAST_BUCKET`` with
the padding masked out; the padded slots are cut from the returned keys/values again.

Precision: ``f32`` sets ``INFERENCE_PRECISION_HINT=f32`` (matches torch to ~1e-5; OpenVINO
otherwise runs bf16 on CPUs that have it), ``bf16``/``f16`` set that hint, ``int8`` compresses
the weights with NNCF (``pip install nncf``) and keeps the default hint.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.logs import get_logger
from edge_worker.backends.base import IncrementalBackend, IncrementalState
from edge_worker.backends.convert import (
    adopt_identity,
    cache_key,
    cached_conversion,
    check_precision,
    default_cache_dir,
    model_folder,
)
from edge_worker.devices import BackendUnavailableError, require

log = get_logger("specd.edge.openvino")

EXPORT_VERSION = "ov-stateless-1"
"""Bumped whenever the wrapper's inputs or outputs change: part of the cache key."""
PAST_BUCKET = 64
PRECISIONS = ("f32", "f16", "bf16", "int8")
HINTS = {"f32": "f32", "f16": "f16", "bf16": "bf16"}


class OpenVINODraftState(IncrementalState):
    def __init__(self, layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        self.past: list[np.ndarray] = [empty] * (2 * layers)  # k0, v0, k1, v1, ...


class OpenVINODraftBackend(IncrementalBackend):
    name = "openvino"

    def __init__(self, model: str, device: str = "CPU", precision: str = "f32",
                 cache_dir: Path | None = None, trust_remote_code: bool = False, threads: int = 0) -> None:
        require("openvino")
        import openvino as ov

        check_precision("openvino", precision, PRECISIONS)
        folder = model_folder(model, cache_dir or "")
        meta = adopt_identity(self, model, folder, trust_remote_code)
        text = meta.config.get_text_config()
        self._layers, self._kv_heads = int(text.num_hidden_layers), int(text.num_key_value_heads)
        self._head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        key = cache_key(folder, EXPORT_VERSION, precision, ov.__version__, _transformers_version())
        root = (cache_dir or default_cache_dir()) / "openvino"
        self.ir_folder, self.converted = cached_conversion(
            root, key, lambda out: _convert(folder, out, precision, trust_remote_code),
            {"model": model, "precision": precision, "openvino": ov.__version__})
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": HINTS[precision]} if precision in HINTS else {}
        if threads > 0 and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self._compiled = core.compile_model(str(self.ir_folder / "model.xml"), device, config)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()  # one inference at a time on the shared request
        self.device = _execution_device(self._compiled, device)
        self.precision = precision

    def new_state(self) -> OpenVINODraftState:
        return OpenVINODraftState(self._layers, self._kv_heads, self._head_dim)

    def _truncate(self, state: OpenVINODraftState, keep: int) -> None:
        state.past = [np.ascontiguousarray(p[:, :, :keep]) for p in state.past]

    def _feed(self, state: OpenVINODraftState, tokens: list[int]) -> torch.Tensor:  # [V]
        past_len, count = len(state.tokens), len(tokens)
        capacity = -(-past_len // PAST_BUCKET) * PAST_BUCKET
        padding = ((0, 0), (0, 0), (0, capacity - past_len), (0, 0))
        inputs = [np.asarray([tokens], np.int64),
                  np.arange(past_len, past_len + count, dtype=np.int64)[None],
                  causal_mask(past_len, count, capacity),
                  *(np.pad(p, padding) if capacity > past_len else p for p in state.past)]
        with self._lock:
            result = self._request.infer(inputs, share_outputs=False)
            outputs = [result[port] for port in self._compiled.outputs]
        state.past = [p if capacity == past_len else
                      np.concatenate([p[:, :, :past_len], p[:, :, capacity:]], axis=2) for p in outputs[1:]]
        state.tokens.extend(tokens)
        return torch.from_numpy(np.asarray(outputs[0][0, -1], np.float32))


def causal_mask(past: int, count: int, capacity: int | None = None) -> np.ndarray:
    """Additive mask [1, 1, count, capacity + count]: new token i sees the ``past`` real slots
    (of ``capacity``, the rest is padding) and new tokens 0..i."""
    capacity = past if capacity is None else capacity
    blocked = np.ones((count, capacity + count), bool)
    blocked[:, :past] = False
    blocked[:, capacity:] = np.triu(np.ones((count, count), bool), k=1)
    mask = np.zeros((1, 1, count, capacity + count), np.float32)
    mask[0, 0][blocked] = np.finfo(np.float32).min
    return mask


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _execution_device(compiled: Any, asked: str) -> str:
    """The device OpenVINO actually runs on (``EXECUTION_DEVICES``), else the one compiled for."""
    try:
        devices = compiled.get_property("EXECUTION_DEVICES")
        return str(devices[0]) if devices else asked
    except Exception:  # noqa: BLE001 - older plugins lack the property
        return asked


class _PastKeyValuesWrapper(torch.nn.Module):
    """(input_ids, position_ids, mask4d, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        layers: list[Any] = list(cache.layers)
        for index, layer in enumerate(layers):  # pre-filled: no empty-tensor concat to trace
            layer.dtype, layer.device = past[2 * index].dtype, past[2 * index].device
            layer.keys, layer.values = past[2 * index], past[2 * index + 1]
            layer.is_initialized = True
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         past_key_values=cache, use_cache=True)
        flat: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _convert(folder: Path, out: Path, precision: str, trust_remote_code: bool) -> None:
    """Trace the wrapper on a small example and write ``out/model.xml`` (+ ``.bin``)."""
    import openvino as ov
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                 trust_remote_code=trust_remote_code).eval()
    text = model.config.get_text_config()
    kv_heads = int(text.num_key_value_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    past_len, count = 3, 2  # any small shapes: every dimension is dynamic in the IR
    past = [torch.zeros(1, kv_heads, past_len, head_dim) for _ in range(2 * int(text.num_hidden_layers))]
    example = (torch.tensor([[1, 2]]), torch.tensor([[3, 4]]),
               torch.from_numpy(causal_mask(past_len, count)), *past)
    with torch.no_grad():
        ov_model = ov.convert_model(_PastKeyValuesWrapper(model), example_input=example)
    if precision == "int8":
        ov_model = _compress_int8(ov_model)
    ov.save_model(ov_model, str(out / "model.xml"), compress_to_fp16=precision in ("f16", "bf16"))


def _compress_int8(ov_model: Any) -> Any:
    # NNCF reports on stdout (a log handler bound to it at import, a progress bar), and stdout
    # is the product's: `specd generate --json` writes its one JSON document there.
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        try:
            import nncf  # type: ignore[import-not-found]
        except ImportError as exc:
            raise BackendUnavailableError("openvino precision int8 needs NNCF: pip install nncf "
                                          "(or use precision f32/bf16/f16)") from exc
        _handlers_to_stderr(logging.getLogger("nncf"), (stdout, sys.__stdout__))
        return nncf.compress_weights(ov_model)


def _handlers_to_stderr(logger: logging.Logger, streams: tuple[Any, ...]) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and any(handler.stream is s for s in streams):
            handler.setStream(sys.stderr)
