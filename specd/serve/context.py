"""What a request handler needs (the runner, defaults, API keys, metrics registries).

Kept apart from ``app`` so that ``specd chat``, which runs the same runner in a terminal, works
on the base install: without fastapi and uvicorn (the ``serve`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specd.serve.auth import KeyRing
from specd.serve.runner import SessionRunner
from specd.serve.schemas import Defaults


@dataclass
class ServeContext:
    runner: SessionRunner
    defaults: Defaults
    keys: KeyRing
    registries: list[Any]  # prometheus CollectorRegistry objects shown on /metrics besides the server's own
