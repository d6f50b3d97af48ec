"""A verifier task and an edge client in this process, both talking to a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from common.settings import Settings
from specd.runtime import build_edge, build_verifier, make_broker


@contextlib.asynccontextmanager
async def local_pool(settings: Settings, worker_id: str = "v-test") -> AsyncIterator[tuple[Any, Any]]:
    """Yield (verifier worker, edge client); stops the verifier and closes both brokers after."""
    verifier_broker, edge_broker = make_broker(settings), make_broker(settings)
    verifier = build_verifier(settings, verifier_broker, worker_id=worker_id)
    stop = asyncio.Event()
    task = asyncio.create_task(verifier.run(stop))
    edge = build_edge(settings, edge_broker)
    try:
        yield verifier, edge
    finally:
        stop.set()
        await task
        await verifier_broker.close()
        await edge_broker.close()
