"""ONNX Runtime GenAI draft backend: one generator per session, appended to and rewound.

The GenAI model folder is built once from the Hugging Face folder by onnxruntime-genai's own
model builder (``python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32 -e cpu``), run
offline in a subprocess, and cached on disk (see ``convert.py``). A session owns one
``og.Generator``: drafting appends tokens and reads ``get_output("logits")`` (the logits of the
appended positions), a rejection is undone with ``rewind_to(n)``.

Providers: ``cpu`` here; ``cuda``, ``dml`` (DirectML), ``webgpu`` and ``qnn`` where the installed
onnxruntime-genai build has them (``specd devices`` lists them). The builder's ``-e`` follows the
provider (``qnn`` uses the CPU build of the graph).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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
from edge_worker.devices import require

log = get_logger("specd.edge.genai")

PRECISIONS = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "int8": "int8", "int4": "int4"}
BUILDER_TARGET = {"cpu": "cpu", "cuda": "cuda", "dml": "dml", "webgpu": "webgpu", "qnn": "cpu"}
BUILD_TIMEOUT_S = 1800


class BuildError(Exception):
    """The onnxruntime-genai model builder failed; the message carries its output's tail."""


class GenAIDraftState(IncrementalState):
    def __init__(self, generator: Any) -> None:
        super().__init__()
        self.generator = generator


class GenAIDraftBackend(IncrementalBackend):
    name = "genai"

    def __init__(self, model: str, provider: str = "cpu", precision: str = "f32",
                 cache_dir: Path | None = None, trust_remote_code: bool = False) -> None:
        require("genai")
        import onnxruntime_genai as og

        check_precision("genai", precision, PRECISIONS)
        folder = model_folder(model, cache_dir or "")
        meta = adopt_identity(self, model, folder, trust_remote_code)
        target = BUILDER_TARGET[provider]
        key = cache_key(folder, PRECISIONS[precision], target, og.__version__)
        root = (cache_dir or default_cache_dir()) / "genai"
        self.model_folder, self.converted = cached_conversion(
            root, key, lambda out: build_genai_folder(folder, out, PRECISIONS[precision], target),
            {"model": model, "precision": precision, "builder_target": target, "genai": og.__version__})
        config = og.Config(str(self.model_folder))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        self._og = og
        self._model = og.Model(config)
        self._max_length = int(getattr(meta.config.get_text_config(), "max_position_embeddings", 0) or 4096)
        self.device, self.precision = provider, precision

    def new_state(self) -> GenAIDraftState:
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=self._max_length, do_sample=False, batch_size=1)
        return GenAIDraftState(self._og.Generator(self._model, params))

    def _truncate(self, state: GenAIDraftState, keep: int) -> None:
        state.generator.rewind_to(keep)

    def _feed(self, state: GenAIDraftState, tokens: list[int]) -> torch.Tensor:  # [V]
        state.generator.append_tokens(np.asarray([tokens], np.int32))
        state.tokens.extend(tokens)
        logits = state.generator.get_output("logits")  # [1, len(tokens), V]
        return torch.from_numpy(np.array(logits[0, -1], np.float32))

    def release(self, state: Any) -> None:
        state.generator = None  # frees the session's KV buffers now, not at the next GC


def build_genai_folder(hf_folder: Path, out: Path, precision: str, target: str) -> None:
    """Run onnxruntime-genai's builder offline in a subprocess (it imports torch itself)."""
    with tempfile.TemporaryDirectory(prefix="specd-genai-") as scratch:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder),
                   "-o", str(out), "-p", precision, "-e", target, "-c", scratch]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT_S,
                              check=False)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (done.stdout + done.stderr)[-2000:]
        raise BuildError(f"onnxruntime-genai builder failed for {hf_folder} ({' '.join(command)}):\n{tail}")
