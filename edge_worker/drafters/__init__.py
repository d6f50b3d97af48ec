"""Every drafter, registered by name (``registry``): one module per drafter, one line below each.

A new drafter is one module that calls ``register(Drafter(...))`` and its name in ``BUILTIN``
(or, outside this package, one ``register`` call before the settings are read).
"""

from __future__ import annotations

import importlib

from edge_worker.drafters.registry import REGISTRY, DraftContext, Drafter, get, register, unregister

BUILTIN = (
    "torch_model",
    "feature_model",
    "openvino_model",
    "genai_model",
    "replay",
    "prompt_lookup",
    "router",
)

for _module in BUILTIN:
    importlib.import_module(f"edge_worker.drafters.{_module}")

__all__ = ["BUILTIN", "REGISTRY", "DraftContext", "Drafter", "get", "register", "unregister"]
