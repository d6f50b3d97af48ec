"""Redis Cluster mode: the client, slot grouping, and one reader per slot group.

Selected by a ``redis+cluster://host:port,host:port`` URL (``rediss+cluster://`` with TLS): the
listed nodes seed redis-py's asyncio ``RedisCluster``, which follows MOVED/ASK redirections and
re-reads the slot map when a master fails and its replica is promoted. A cluster refuses a
command whose keys span slots, so every command here touches one slot:

* session keys carry a shard tag (``broker.streams.Keys``), so a verifier's sessions fall into
  at most ``tenants x shards`` slots whatever their number;
* a verifier keeps at most one XREADGROUP in flight per slot group (``SlotReader``): the
  commands per iteration follow the slot groups, not the sessions;
* multi-session writes are split by slot (``by_slot``) and pipelined per node by redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

SCHEMES = ("redis+cluster://", "rediss+cluster://")
DEFAULT_SHARDS = 8
# redis-py retries a command whose node is gone (re-reading the slot map in between) this many
# times, at most 0.25 s apart (jittered): about 5 s, longer than a replica's promotion after the node
# timeout, and short steps so that the first command after it is not held back by a long backoff.
FAILOVER_RETRIES = 40
T = TypeVar("T")


def is_cluster_url(url: str) -> bool:
    return url.startswith(SCHEMES)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def seed_nodes(url: str) -> list[tuple[str, int]]:
    """``redis+cluster://[user:pass@]h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)]."""
    rest = url.split("://", 1)[1].split("/", 1)[0]
    rest = rest.rpartition("@")[2]
    nodes = []
    for part in filter(None, rest.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster seed {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError("a redis+cluster:// URL needs at least one host:port")
    return nodes


def connect_cluster(url: str, socket_timeout_s: float = 30.0, *, username: str = "", password: str = "",
                    tls_ca_file: str = "", tls_cert_file: str = "", tls_key_file: str = "") -> RedisCluster:
    """A RedisCluster client seeded with the URL's nodes; bytes in, bytes out.

    Credentials in the URL are used unless ``username``/``password`` are given. Many connections
    per node (a verifier keeps a read in flight per slot group; a plain edge one per session).
    """
    parts = urlsplit(url.replace("+cluster", "", 1).split(",", 1)[0])
    options: dict[str, Any] = {
        "username": username or (unquote(parts.username) if parts.username else None),
        "password": password or (unquote(parts.password) if parts.password else None),
    }
    if url.startswith("rediss+"):
        options.update(ssl=True, ssl_cert_reqs="required", ssl_ca_certs=tls_ca_file or None,
                       ssl_certfile=tls_cert_file or None, ssl_keyfile=tls_key_file or None)
    return _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in seed_nodes(url)],
        decode_responses=False, socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 5.0), max_connections=4096,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.25), retries=FAILOVER_RETRIES),
        **options,
    )


class _Cluster(RedisCluster):
    """RedisCluster that finishes (re)reading the slot map before it routes a command.

    redis-py 8 works out a command's slot before its lazy initialisation; concurrent first
    commands on a fresh client (or right after a failover reset the map) then fail with
    ConnectionError or AttributeError. Initialising first (under redis-py's own lock) avoids it.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        if args and text(args[0]).upper() == "ACL" and "target_nodes" not in kwargs:
            kwargs["target_nodes"] = self.get_default_node()  # keyless: any node answers for itself
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            raise _reset(exc) from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise ValueError("a cluster pipeline takes no shard_hint")
        return _Pipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own


class _Pipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as exc:
            raise _reset(exc) from exc


def _reset(exc: AttributeError) -> RedisConnectionError:
    """redis-py closes a node's connections when a failover resets the slot map, sometimes under
    a command still using one (``'NoneType' object has no attribute 'writelines'``): that is a
    lost connection, retried like one, not a bug of ours."""
    return RedisConnectionError(f"connection reset while the cluster's slot map changed ({exc})")


def text(value: Any) -> str:
    """A Redis reply value as text (bytes decoded; None: empty): the one decoder of replies."""
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def by_slot(keys: Iterable[str]) -> dict[int, list[str]]:
    """Keys grouped by their cluster slot, in first-seen order."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return groups


def slot_groups(keys: list[str], cluster: bool, size: int) -> list[list[int]]:
    """Indices of ``keys`` grouped by slot (one group without a cluster), ``size`` at most each:
    the calls of a multi-session script (its keys must share a slot on a cluster)."""
    by: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by.setdefault(slot_of(key) if cluster else 0, []).append(i)
    return [group[n:n + size] for group in by.values() for n in range(0, len(group), size)]


class SlotReader(Generic[T]):
    """At most one read in flight per slot group, harvested by the worker loop each iteration.

    A blocking read on a slot group cannot be cancelled safely (redis-py drops the connection and
    the entries it was delivering stay pending), so an unfinished one is kept across iterations:
    its group gets no second read until it answers, which it does as soon as any of its streams
    has an entry. A non-blocking iteration waits only for the reads it started itself (one round
    trip); a blocking one waits for the first read to answer or the block to pass.
    """

    def __init__(self, read: Callable[[list[str], int | None, int], Coroutine[Any, Any, list[T]]]) -> None:
        self._read = read
        self._inflight: dict[int, asyncio.Task[list[T]]] = {}
        self.commands = 0  # reads issued (for the commands-per-iteration measurement)

    async def read(self, streams: list[str], block_ms: int | None, count: int) -> list[T]:
        started = []
        for slot, keys in by_slot(streams).items():
            if slot not in self._inflight:
                self._inflight[slot] = asyncio.create_task(self._read(keys, block_ms, count))
                started.append(self._inflight[slot])
                self.commands += 1
        pending = set(self._inflight.values())
        if not pending:
            return []
        if block_ms is None:
            await asyncio.wait(started or pending, return_when=asyncio.ALL_COMPLETED if started
                               else asyncio.FIRST_COMPLETED, timeout=None if started else 0)
        else:
            await asyncio.wait(pending, timeout=block_ms / 1000 + 0.05, return_when=asyncio.FIRST_COMPLETED)
        return self._harvest()

    def _harvest(self) -> list[T]:
        out: list[T] = []
        errors = []
        for slot, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[slot]
                if task.exception() is not None:
                    errors.append(task.exception())
                else:
                    out.extend(task.result())
        if errors and not out:
            raise errors[0]  # type: ignore[misc]  # the loop's backoff handles it; entries first
        return out

    def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        self._inflight.clear()


async def gather_by_slot(keys: Iterable[str], run: Callable[[list[str]], Awaitable[T]]) -> list[T]:
    """Run one command (or pipeline) per slot group, concurrently."""
    return list(await asyncio.gather(*(run(group) for group in by_slot(keys).values())))


async def run_scripts(redis: Any, calls: list[tuple[Any, list[Any], list[Any]]]) -> list[Any]:
    """Run ``(script, keys, args)`` calls in one pipeline; each reply, or its error.

    They go as plain EVALSHA commands: redis-py refuses pipelined scripts on a cluster (one
    pipeline per node here), and on one node its pipelined scripts cost a SCRIPT EXISTS round
    trip first. A node without the script (a replica just promoted, a restarted node) answers
    NOSCRIPT: the scripts are loaded on every master and those calls run again.
    """
    from redis.exceptions import NoScriptError

    replies = await _evalsha_pipeline(redis, calls)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
            await redis.script_load(script.script)
        again = await _evalsha_pipeline(redis, [calls[i] for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
    return replies


async def _evalsha_pipeline(redis: Any, calls: list[tuple[Any, list[Any], list[Any]]]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
