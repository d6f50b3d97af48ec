"""Is Redis there, and a verifier on it? Bounded waits at start-up, and one message each when not.

Commands used to retry an unreachable Redis forever (and ignore signals meanwhile); now each one
pings for up to ``redis.startup_wait_s`` and then stops with ``RedisUnavailable``.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from broker.streams import TRANSIENT_ERRORS


class RedisUnavailable(Exception):
    """Redis could not be reached (refused, unknown host, timeout, or wrong credentials)."""


_PASSWORD = re.compile(r"(//[^:/@]*:)[^@/]*@")  # the ":password@" of scheme://user:password@host...


def redacted(url: str) -> str:
    """The URL without its password, fit for messages and logs (cluster seed lists included)."""
    return _PASSWORD.sub(r"\1***@", url, count=1)


def unreachable(url: str, exc: BaseException) -> RedisUnavailable:
    reason = str(exc).strip() or type(exc).__name__
    return RedisUnavailable(
        f"cannot reach Redis at {redacted(url)} ({reason}); start Redis there or give the right "
        "--redis-url / SPECD_REDIS__URL")


async def ensure_reachable(client: Any, url: str, wait_s: float) -> None:
    """PING until it answers or ``wait_s`` has passed (then ``RedisUnavailable``).

    Authentication and permission errors are not retried: they will not heal by waiting.
    """
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            await client.ping()
            return
        except NoPermissionError:  # an ACL user without PING: the server answered, it is there
            return
        except (AuthenticationError, ResponseError) as exc:
            raise RedisUnavailable(f"Redis at {redacted(url)} refused us: {exc}; check "
                                   "redis.username / redis.password and the ACL") from None
        except TRANSIENT_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise unreachable(url, exc) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class NoVerifierAlive(Exception):
    """No verifier heartbeats in Redis: every session would wait out its verdict timeout."""


async def require_verifier(broker: Any, url: str, wait_s: float) -> None:
    """Fail fast, as serve's pool check does, when no verifier heartbeats (after up to ``wait_s``
    for one that is starting). Where the ACL forbids SCAN (an edge's) nothing can be told: the
    sessions' verdict timeouts still bound the wait."""
    from redis.exceptions import ResponseError

    deadline = time.monotonic() + wait_s
    try:
        while not await broker.any_healthy("verifier"):
            if time.monotonic() >= deadline:
                raise NoVerifierAlive(
                    f"no verifier is alive at {redacted(url)} (no verifier heartbeat under prefix "
                    f"{broker.keys.prefix!r} within {wait_s:g} s): start `specd verifier` against it, "
                    "or check --redis-url and redis.key_prefix")
            await asyncio.sleep(0.2)
    except ResponseError:  # NOPERM: SCAN is not in this user's ACL
        return
