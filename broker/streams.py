"""Redis Streams adapter: session-keyed draft and verdict streams, a session-open stream.

Key layout (the ``{session}`` hash tag keeps one session's keys in one Redis Cluster slot):

    {prefix}:opens:{{tenant}}          stream of the tenant's SessionOpen messages (group "verifiers")
    {prefix}:{{sid}}:drafts            the session's drafts and its close (consumer group "verifiers")
    {prefix}:{{sid}}:verdicts          verdicts and errors for the edge (read with XREAD)

Every entry of these streams carries an HMAC of its payload under the session's key (field
``a``; common.integrity): the key is derived on each side and never stored in Redis.
    {prefix}:{{sid}}:tokens            string: the committed context (prompt + generated) as uint32
                                       LE, appended each round (never re-serialised)
    {prefix}:{{sid}}:state             hash: next_seq, last verdict and its MAC, lease epoch
    {prefix}:{{sid}}:meta              hash: the session's open message and its MAC (for adoption)
    {prefix}:{{sid}}:lease             ``worker/epoch`` of the owning verifier, PX lifetime (broker.pool)
    {prefix}:health:{role}:{worker}    heartbeat key with a TTL

On a Redis Cluster (a ``redis+cluster://`` URL: broker.cluster) session keys carry a shard tag
instead of the session id, ``{prefix}:{{<tenant>.s<n>}}:<sid>:drafts`` with ``n`` a hash of the
sid modulo ``shards``: a verifier's sessions then share a few slots, and it reads each slot
group with one XREADGROUP and writes each with one pipeline, not one command per session.

Identity comes from Redis, not from messages: a session id is ``<tenant>.<random>`` (an id
without a dot belongs to tenant ``default``), the tenant's opens go to its own stream, and a
verifier takes the tenant from the stream it read the open from. So a tenant's ACL user (see
``specd acl``) can only add opens to its own stream and touch its own sessions' keys.

Verifiers discover tenants by a periodic SCAN for open streams (or from settings) and sessions by
reading the open streams. Consumed opens are acknowledged and deleted (XACK + XDEL): an open
stream has no MAXLEN, so nothing is trimmed unread. Every per-session key gets the session TTL
refreshed on each round, so abandoned sessions clean themselves up.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.cluster import (
    DEFAULT_SHARDS,
    SlotReader,
    connect_cluster,
    is_cluster,
    is_cluster_url,
    slot_of,
    text,
)
from common.integrity import mac, mac_ok, session_key
from common.logs import get_logger
from common.settings import RedisSettings, Settings

__all__ = ["mac", "mac_ok", "session_key"]  # re-exported: the session keys of every stream entry

GROUP = "verifiers"
FIELD = b"m"
MAC_FIELD = b"a"
DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A cluster mid-failover answers CLUSTERDOWN/TRYAGAIN/MASTERDOWN or has a slot uncovered for a
# moment: transient like a lost connection (redis-py re-reads the slot map on the next command).
TRANSIENT_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, ClusterDownError,
                    TryAgainError, MasterDownError, SlotNotCoveredError)

log = get_logger(__name__)
T = TypeVar("T")


class BrokerError(Exception):
    """A structural broker failure (wrong server, missing group): not retried."""


class SessionDataError(BrokerError):
    """A Redis reply a tenant shaped for one session's or one tenant's keys.

    A key of the wrong type, a stream whose top id blocks ``XADD *``, an oversized value, or a
    command Redis refused: the session (or the open) it belongs to fails with a typed error and
    every other session goes on. ``keys`` names the keys found bad, where known.
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


SESSION_DATA_ERRORS = (ResponseError, SessionDataError)
"""What a per-session boundary catches: replies shaped by a tenant's writes (WRONGTYPE, a blocked
id, NOPERM, NOGROUP on a deleted stream), never Python errors (bugs) nor lost connections."""


@dataclass(frozen=True)
class Entry:
    stream: str  # key
    entry_id: str
    payload: bytes | None  # None when the entry had no payload field (treated as malformed)
    hops: int = 0  # session opens: how many times verifiers passed this open on
    since_ms: int = 0  # session opens passed on: when the first verifier saw it (epoch ms)
    mac: bytes | None = None  # the HMAC its writer put beside the payload (common.integrity)


def tenant_of(sid: str) -> str:
    """The tenant a session id belongs to: the part before the first dot (``default`` without)."""
    head, dot, _ = sid.partition(".")
    return head if dot else DEFAULT_TENANT


def new_session_id(tenant: str = DEFAULT_TENANT) -> str:
    """A fresh session id: ``{tenant}.{32 hex digits}``, in the tenant's key space (its ACL)."""
    return f"{tenant}.{uuid.uuid4().hex}"


def short_session_id(sid: str) -> str:
    """A session id for tables and terminals: 8 characters of its random part, and its tenant
    unless that is the default one."""
    tenant, _, rest = sid.partition(".")
    if not rest:
        return sid[:8]
    return rest[:8] if tenant == DEFAULT_TENANT else f"{tenant}.{rest[:8]}"


def shard_of(sid: str, shards: int) -> int:
    """A session's shard (cluster mode): stable across processes (CRC32, not Python's hash)."""
    return zlib.crc32(sid.encode()) % shards


def connect(url: str, socket_timeout_s: float = 30.0, *, username: str = "", password: str = "",
            tls_ca_file: str = "", tls_cert_file: str = "", tls_key_file: str = "",
            max_connections: int = 0) -> aioredis.Redis:
    """A redis.asyncio client (hiredis parser when installed); bytes in, bytes out.

    A ``redis+cluster://host:port,host:port`` URL (``rediss+cluster://`` with TLS) gives a
    Redis Cluster client seeded with those nodes (broker.cluster); everything else one node.

    ``username``/``password`` log in as a Redis ACL user (they override credentials in the URL).
    A ``rediss://`` URL speaks TLS and verifies the server certificate against ``tls_ca_file``
    (system CAs when empty); ``tls_cert_file``/``tls_key_file`` present a client certificate.
    ``max_connections``: a pool of that many connections that waits for a free one instead of
    failing (redis-py's default pool raises past 100; a load-test edge sends from hundreds of
    sessions at once). A cluster client keeps its own pool per node.
    """
    if is_cluster_url(url):
        return connect_cluster(url, socket_timeout_s, username=username, password=password,  # type: ignore[return-value]
                               tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                               tls_key_file=tls_key_file)
    options: dict[str, Any] = {}
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if url.startswith("rediss://"):
        options.update(ssl_cert_reqs="required", ssl_ca_certs=tls_ca_file or None,
                       ssl_certfile=tls_cert_file or None, ssl_keyfile=tls_key_file or None)
    elif tls_ca_file or tls_cert_file or tls_key_file:
        raise BrokerError("TLS files are set but the Redis URL is not rediss://")
    if max_connections:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout_s, decode_responses=False,
            socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            health_check_interval=30, retry_on_timeout=False, **options)
        return aioredis.Redis(connection_pool=pool)
    return aioredis.Redis.from_url(
        url, decode_responses=False, socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s, health_check_interval=30,
        retry_on_timeout=False, **options,
    )


def connect_settings(redis: RedisSettings, max_connections: int = 0) -> aioredis.Redis:
    """``connect`` with the URL, credentials and TLS files of the ``[redis]`` settings."""
    return connect(redis.url, redis.socket_timeout_s, username=redis.username, password=redis.password,
                   tls_ca_file=redis.tls_ca_file, tls_cert_file=redis.tls_cert_file,
                   tls_key_file=redis.tls_key_file, max_connections=max_connections)


class Keys:
    def __init__(self, prefix: str, shards: int = 0) -> None:
        self.prefix = prefix
        self.shards = shards  # 0: one hash tag per session (one node); n: n slot groups per tenant
        self.opens_pattern = f"{prefix}:opens:*"
        self.logs = f"{prefix}:logs"
        # The pool's registries (broker.pool, docs/pool.md).
        self.leases = f"{prefix}:leases"
        self.owners = f"{prefix}:owners"
        self.workers = f"{prefix}:workers"
        self.deadletter = f"{prefix}:deadletter"

    def tenant_sessions(self, tenant: str) -> str:
        """The tenant's admitted sessions (for ``max_sessions``)."""
        return f"{self.prefix}:tenant:{tenant}:sessions"

    def tenant_bucket(self, tenant: str) -> str:
        """The tenant's draft-token bucket (for ``draft_tokens_per_s``)."""
        return f"{self.prefix}:tenant:{tenant}:bucket"

    def wake(self, tenant: str, token: str) -> str:
        """A multiplexed verdict reader's wake-up stream, in the tenant's key space (its ACL)."""
        return f"{self.prefix}:{{{tenant}.mux-{token}}}:wake"

    def opens(self, tenant: str) -> str:
        """The tenant's session-open stream (``{tenant}`` hash tag: one slot per tenant)."""
        return f"{self.prefix}:opens:{{{tenant}}}"

    def tenant_of_opens(self, stream: str) -> str | None:
        """The tenant whose open stream this is; None for any other key."""
        head = f"{self.prefix}:opens:{{"
        if not (stream.startswith(head) and stream.endswith("}")):
            return None
        tenant = stream[len(head):-1]
        return tenant if TENANT_PATTERN.fullmatch(tenant) else None

    def deferred(self, tenant: str) -> str:
        """Opens of the tenant that verifiers passed on or that wait for room: only verifiers write
        it (edges' ACLs name ``opens:{tenant}`` alone), so no tenant can block its ids."""
        return f"{self.prefix}:deferred:{{{tenant}}}"

    def tokens(self, sid: str) -> str:
        return f"{self._session(sid)}:tokens"

    def drafts(self, sid: str) -> str:
        return f"{self._session(sid)}:drafts"

    def verdicts(self, sid: str) -> str:
        return f"{self._session(sid)}:verdicts"

    def state(self, sid: str) -> str:
        return f"{self._session(sid)}:state"

    def meta(self, sid: str) -> str:
        return f"{self._session(sid)}:meta"

    def lease(self, sid: str) -> str:
        return f"{self._session(sid)}:lease"

    def _session(self, sid: str) -> str:
        """The head of a session's keys: its own hash tag, or its shard's (cluster mode)."""
        if not self.shards:
            return f"{self.prefix}:{{{sid}}}"
        return f"{self.prefix}:{{{tenant_of(sid)}.s{shard_of(sid, self.shards)}}}:{sid}"

    def session_keys(self, sid: str) -> list[str]:
        return [self.drafts(sid), self.verdicts(sid), self.state(sid), self.tokens(sid)]

    def health(self, role: str, worker_id: str) -> str:
        return f"{self.prefix}:health:{role}:{worker_id}"

    def session_of(self, stream: str) -> str:
        """The session id inside a per-session key."""
        if self.shards:
            return stream[stream.index("}:") + 2: stream.rindex(":")]
        return stream[stream.index("{") + 1: stream.rindex("}")]


class Broker:
    def __init__(self, client: aioredis.Redis, prefix: str = "specd", maxlen: int = 1000,
                 session_ttl_s: int = 600, shards: int | None = None) -> None:
        self.redis = client
        self.cluster = is_cluster(client)
        if shards is None:
            shards = DEFAULT_SHARDS if self.cluster else 0
        self.keys = Keys(prefix, shards)
        self.maxlen = maxlen
        self.ttl = session_ttl_s
        self._readers: dict[str, SlotReader[Entry]] = {}  # cluster mode: per consumer

    async def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        await self.redis.aclose()

    async def ping(self) -> float:
        """Round-trip time to Redis in milliseconds."""
        start = time.perf_counter()
        await self.redis.ping()
        return (time.perf_counter() - start) * 1000

    # ------------------------------------------------------------ groups

    async def ensure_group(self, stream: str, start_id: str = "0") -> None:
        """Create the verifiers' consumer group (and the stream) if missing: idempotent."""
        try:
            await self.redis.xgroup_create(stream, GROUP, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return
            if "WRONGTYPE" in str(exc):
                raise SessionDataError(f"{stream} is not a stream", (stream,)) from exc
            raise BrokerError(f"cannot create group on {stream}: {exc}") from exc

    # ------------------------------------------------------------ edge side

    async def open_session(self, sid: str, payload: bytes, tag: bytes | None = None) -> None:
        """Queue the open (and its MAC) on the session's tenant's stream (no MAXLEN: never trimmed unread)."""
        await self.redis.xadd(self.keys.opens(tenant_of(sid)), _fields(payload, tag))

    async def session_known(self, sid: str, typed: bool = False) -> bool:
        """Whether a verifier took the session (its meta key exists): an edge's open went through.

        ``typed`` (verifiers): only a hash counts, the type a verifier writes; a stream an edge
        planted there is no sign of a served session (the lease script then refuses the keys).
        """
        if typed:
            return text(await self.redis.type(self.keys.meta(sid))) == "hash"
        return bool(await self.redis.exists(self.keys.meta(sid)))

    async def send_draft(self, sid: str, payload: bytes, tag: bytes | None = None) -> str:
        """A draft or close (and its MAC) on the session's draft stream."""
        key = self.keys.drafts(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, _fields(payload, tag), maxlen=self.maxlen, approximate=True)
            pipe.expire(key, self.ttl)
            entry_id, _ = await pipe.execute()
        return text(entry_id)

    async def read_verdicts(self, sid: str, last_id: str, block_ms: int) -> list[Entry]:
        """Verdicts after ``last_id``; blocks up to ``block_ms`` when there are none."""
        key = self.keys.verdicts(sid)
        reply = await self.redis.xread({key: last_id}, block=block_ms, count=16)
        return _entries(reply)

    # ------------------------------------------------------------ verifier side

    async def read_work(self, consumer: str, streams: list[str], block_ms: int | None,
                        count: int = 8) -> list[Entry]:
        """New entries for this consumer from the sessions stream and the given draft streams.

        A missing group (Redis restarted without persistence, or a session's keys expired) is
        recreated and the read answers nothing this time, instead of failing the worker. A stream
        deleted while the read blocked on it (``UNBLOCKED``: a session's keys deleted or expired,
        or a flushed Redis) also answers nothing: the next read names only live streams, and a
        live one that lost its group gets NOGROUP, handled above.

        On a cluster: one XREADGROUP per slot group, kept in flight across calls (broker.cluster).
        """
        if self.cluster:
            reader = self._readers.get(consumer)
            if reader is None:
                reader = self._readers[consumer] = SlotReader(
                    lambda keys, block, n: self._read_group(consumer, keys, block, n))
            return await reader.read(streams, block_ms, count)
        return await self._read_group(consumer, streams, block_ms, count)

    async def _read_group(self, consumer: str, streams: list[str], block_ms: int | None,
                          count: int) -> list[Entry]:
        try:
            reply = await self.redis.xreadgroup(
                GROUP, consumer, {stream: ">" for stream in streams}, count=count, block=block_ms,
            )
        except ResponseError as exc:
            if str(exc).startswith("UNBLOCKED"):
                log.info("broker.read_unblocked", error=str(exc), streams=len(streams))
                return []
            if "WRONGTYPE" in str(exc):  # a key replaced by another type: name it, read the rest next time
                raise SessionDataError(str(exc), tuple(await self.not_streams(streams))) from exc
            if "NOGROUP" not in str(exc):
                raise
            log.warning("broker.groups_recreated", error=str(exc), streams=len(streams))
            for stream in streams:
                await self.ensure_group(stream)
            return []
        return _entries(reply)

    async def not_streams(self, keys: list[str]) -> list[str]:
        """The keys that exist with a type other than stream (one TYPE each, pipelined)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
            types = await pipe.execute()
        return [key for key, kind in zip(keys, types, strict=True) if text(kind) not in ("stream", "none")]

    async def read_pending(self, consumer: str, stream: str) -> list[Entry]:
        """Entries delivered to this consumer earlier but never acknowledged (after a restart)."""
        reply = await self.redis.xreadgroup(GROUP, consumer, {stream: "0"}, count=1000)
        return _entries(reply)

    async def claim_idle(self, consumer: str, stream: str, min_idle_ms: int) -> list[Entry]:
        """Take over entries another consumer left pending for ``min_idle_ms`` (XAUTOCLAIM)."""
        try:
            reply = await self.redis.xautoclaim(stream, GROUP, consumer, min_idle_ms, "0-0", count=1000)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(stream)  # Redis restarted empty: nothing can be pending
            return []
        claimed = reply[1]
        return [_entry(stream, i, f) for i, f in claimed if f is not None]

    async def ack(self, stream: str, *entry_ids: str) -> None:
        """Acknowledge and delete consumed entries: streams stay short without any MAXLEN."""
        if entry_ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(stream, GROUP, *entry_ids)
                pipe.xdel(stream, *entry_ids)
                await pipe.execute()

    async def discover_tenants(self, limit: int = 10_000) -> set[str]:
        """Tenants with an open stream (a SCAN: run every few seconds, never per iteration)."""
        found: set[str] = set()
        async for key in self.redis.scan_iter(match=self.keys.opens_pattern, count=1000, _type="stream"):
            tenant = self.keys.tenant_of_opens(text(key))
            if tenant is not None:
                found.add(tenant)
            if len(found) >= limit:
                break
        return found

    async def publish_round(self, rounds: list[RoundResult], ack: tuple[str, str] | None = None) -> None:
        """Publish verdicts, persist session state, refresh TTLs, then ack the drafts.

        One MULTI/EXEC transaction: the ack can never land without its verdict, and a crash
        before EXEC leaves the draft pending for redelivery. On a cluster: one MULTI per slot, and
        the open's ack (another slot) after them: a crash between redelivers the open, answered again.
        """
        if self.cluster:
            groups: dict[int, list[RoundResult]] = {}
            for result in rounds:
                groups.setdefault(slot_of(self.keys.verdicts(result.session_id)), []).append(result)
            await asyncio.gather(*(self._publish(group) for group in groups.values()))
            if ack is not None:
                await self.ack(*ack)
            return
        await self._publish(rounds, ack)

    async def _publish(self, rounds: list[RoundResult], ack: tuple[str, str] | None = None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for result in rounds:
                sid = result.session_id
                fields = {FIELD: result.payload}
                if result.mac is not None:
                    fields[MAC_FIELD] = result.mac
                pipe.xadd(self.keys.verdicts(sid), fields, maxlen=self.maxlen,  # type: ignore[arg-type]
                          approximate=True)
                if result.state:
                    pipe.hset(self.keys.state(sid), mapping=dict(result.state))  # type: ignore[arg-type]
                for key in self.keys.session_keys(sid):
                    pipe.expire(key, self.ttl)
                pipe.expire(self.keys.meta(sid), self.ttl)  # the lease keeps its own PX lifetime
                if result.ack_ids:
                    pipe.xack(self.keys.drafts(sid), GROUP, *result.ack_ids)
            if ack is not None:  # an open answered with an error: acked and deleted with its answer
                pipe.xack(ack[0], GROUP, ack[1])
                pipe.xdel(ack[0], ack[1])
            await pipe.execute()

    async def load_state(self, sid: str) -> dict[bytes, bytes]:
        state: dict[bytes, bytes] = await self.redis.hgetall(self.keys.state(sid))  # type: ignore[assignment]
        return state

    async def load_tokens(self, sid: str, max_bytes: int = 0) -> bytes | None:
        """The committed context (uint32 LE) of a session, as its last commit left it.

        ``max_bytes`` bounds what is read (a value nobody could have committed is refused unread).
        """
        key = self.keys.tokens(sid)
        if max_bytes and int(await self.redis.strlen(key)) > max_bytes:
            raise SessionDataError(f"{key} is longer than any context ({max_bytes} bytes)", (key,))
        value = await self.redis.get(key)
        return value if isinstance(value, bytes) else None

    async def delete_session(self, sid: str, verdict_ttl_s: int | None = None) -> None:
        """Drop the draft stream, state, meta and lease; the verdict stream lives on until its TTL.

        ``verdict_ttl_s`` shortens that TTL: a finished session's edge has its last verdict soon.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.drafts(sid), self.keys.state(sid), self.keys.meta(sid),
                        self.keys.lease(sid), self.keys.tokens(sid))
            if verdict_ttl_s is not None:
                pipe.expire(self.keys.verdicts(sid), verdict_ttl_s)
            await pipe.execute()

    async def existing(self, keys: list[str]) -> set[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            found = await pipe.execute()
        return {key for key, exists in zip(keys, found, strict=True) if exists}

    # ------------------------------------------------------------ health

    async def heartbeat(self, role: str, worker_id: str, ttl_s: int, info: bytes) -> None:
        await self.redis.set(self.keys.health(role, worker_id), info, ex=ttl_s)

    async def healthy(self, role: str, worker_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.health(role, worker_id)))

    async def any_healthy(self, role: str) -> bool:
        """Whether any worker of the role heartbeats (a SCAN: for checks, not hot paths)."""
        async for _ in self.redis.scan_iter(match=self.keys.health(role, "*"), count=100):
            return True
        return False

    async def clear_heartbeat(self, role: str, worker_id: str) -> None:
        await self.redis.delete(self.keys.health(role, worker_id))


@dataclass
class RoundResult:
    session_id: str
    payload: bytes  # an encoded Verdict or ErrorMessage
    ack_ids: list[str]
    state: Mapping[str | bytes, bytes | str | int] | None = None
    mac: bytes | None = None


async def with_backoff(operation: Callable[[], Awaitable[T]], what: str,
                       stop: asyncio.Event | None = None, max_delay_s: float = 5.0,
                       give_up_s: float | None = None) -> T:
    """Retry an operation on transient connection errors with exponential backoff.

    ``give_up_s`` bounds the retrying: after it the last error is raised (clients give up with a
    clear message when Redis stays gone; servers retry until stopped).
    """
    delay = 0.05
    deadline = None if give_up_s is None else time.monotonic() + give_up_s
    while True:
        try:
            return await operation()
        except TRANSIENT_ERRORS as exc:
            stopped = stop is not None and stop.is_set()
            if stopped or (deadline is not None and time.monotonic() >= deadline):
                raise
            log.warning("broker.retry", operation=what, error=str(exc), delay_s=round(delay, 3))
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def _fields(payload: bytes, tag: bytes | None) -> dict[Any, Any]:
    return {FIELD: payload} if tag is None else {FIELD: payload, MAC_FIELD: tag}


def _entries(reply: Any) -> list[Entry]:
    """Flatten an XREAD/XREADGROUP reply (RESP2: ``[[stream, [(id, fields)]]]``) into entries."""
    entries = []
    for stream, messages in reply or []:
        name = text(stream)
        for entry_id, fields in messages:
            entries.append(_entry(name, entry_id, fields))
    return entries


def _entry(stream: str, entry_id: Any, fields: Any) -> Entry:
    if not isinstance(fields, dict):
        return Entry(stream, text(entry_id), None)
    try:
        hops, since = int(fields.get(b"h", 0)), int(fields.get(b"t", 0))
    except ValueError:
        hops, since = 0, 0
    return Entry(stream, text(entry_id), fields.get(FIELD), hops, since, fields.get(MAC_FIELD))


def make_broker(settings: Settings | RedisSettings, url: str | None = None, *,
                max_connections: int = 0) -> Broker:
    """The one place a Broker is built from settings: the configured Redis with its ACL user,
    password and TLS files, key prefix, stream MAXLEN and session TTL.

    ``url``: another server (an embedded one, whose URL carries its own password) instead of
    ``redis.url``; the configured credentials and TLS files then do not apply. ``max_connections``:
    see ``connect``.
    """
    redis = settings.redis if isinstance(settings, Settings) else settings
    if url and url != redis.url:
        client = connect(url, redis.socket_timeout_s, max_connections=max_connections)
    else:
        client = connect_settings(redis, max_connections)
    return Broker(client, prefix=redis.key_prefix, maxlen=redis.stream_maxlen,
                  session_ttl_s=redis.session_ttl_s)
