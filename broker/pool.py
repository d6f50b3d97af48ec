"""Pool coordination in Redis: session leases, the worker load registry, dead letters, tenant limits.

Key layout (besides ``broker.streams``):

    {prefix}:{{sid}}:lease        ``worker/epoch`` of the owner, PX lease_ms, renewed by the owner;
                                  the epoch (``epoch`` in the state hash) grows with each taking
    {prefix}:{{sid}}:meta         hash: ``open`` = the session's open message, ``a`` = its MAC (adoption)
    {prefix}:leases               sorted set: sid -> lease deadline (epoch ms); the registry that
                                  lets a verifier find lapsed sessions without scanning keys
    {prefix}:owners               hash: sid -> worker id (for `specd pool status`)
    {prefix}:workers              hash: worker id -> JSON load (sessions, KV, queue, tenants, at)
    {prefix}:deadletter           stream of messages that kept failing, with their error
    {prefix}:tenant:{t}:sessions  sorted set: sid -> deadline (epoch ms, Redis clock) of tenant t's
                                  admitted sessions, for its pool-wide ``max_sessions``
    {prefix}:tenant:{t}:bucket    hash: ``tokens``, ``at`` (ms): tenant t's draft-token bucket

Taking, renewing and releasing a lease are Lua scripts on the session's own keys (one slot):
the epoch is incremented in the state hash when the lease is taken, and every write of the owner
is fenced by its ``worker/epoch`` value (broker.rounds). An owner that finds its lease held by
another, or the session adopted under a newer epoch, drops the session.

Tenant limits are read-modify-write decisions shared by every verifier, so each is one Lua script
(atomic on the server, one round trip, timed by the Redis clock so that workers' clocks do not
matter): admitting a session checks and adds in one step, and taking draft tokens from a bucket
refills, checks and takes in one step.
"""

from __future__ import annotations

import json
import time
from typing import Any

from broker.cluster import run_scripts, slot_groups, text
from broker.streams import FIELD, GROUP, Broker, Entry, SessionDataError
from common.logs import get_logger

log = get_logger(__name__)

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
"""Lua prelude: ``now``, the Redis server's clock in ms (one clock for every verifier)."""

ADMIT_SESSION = _NOW_MS + """
-- KEYS[1] the tenant's session set; ARGV: sid, limit (0: no check), entry lifetime (ms).
-- Drops lapsed members, then adds the session if the tenant has room or it is a member already.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
local limit = tonumber(ARGV[2])
if limit > 0 and count >= limit and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, count}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, redis.call('ZCARD', KEYS[1])}
"""

REFRESH_SESSIONS = _NOW_MS + """
-- KEYS[1] the tenant's session set; ARGV: entry lifetime (ms), then the sids its owner still holds.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""

TAKE_TOKENS = _NOW_MS + """
-- KEYS[1] the tenant's bucket; ARGV: rate (tokens/s), capacity, then the drafts' costs, oldest first.
-- Takes the longest prefix of costs the bucket covers; a draft larger than the whole bucket passes
-- when the bucket is full (leaving a debt). Returns {drafts taken, ms until the next one fits}.
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil or at == nil then
  tokens, at = capacity, now
end
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate / 1000)
local taken = 0
for i = 3, #ARGV do
  local cost = tonumber(ARGV[i])
  if cost > tokens and tokens < capacity then
    break
  end
  tokens = tokens - cost
  taken = taken + 1
end
local wait = 0
if taken < #ARGV - 2 then
  wait = math.ceil((math.min(tonumber(ARGV[3 + taken]), capacity) - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) * 1000 / rate) + 1000)
return {taken, wait}
"""


SESSION_TYPES = ("string", "hash", "string", "hash", "stream", "stream")
"""The types of a session's keys in ``PoolBroker.session_keys`` order: lease, state, tokens, meta,
drafts, verdicts. An edge may create streams under its own sessions' keys (its ACL allows XADD
there), so the scripts that read these keys check their types first."""

_BAD_KEYS = """
-- The session's keys (KEYS[1..6], SESSION_TYPES order) that exist with another type: deleted
-- (quarantined: no verifier command ever reads them) and returned.
local want = {'string', 'hash', 'string', 'hash', 'stream', 'stream'}
local function bad_keys()
  local bad = {}
  for i = 1, 6 do
    local kind = redis.call('TYPE', KEYS[i])['ok']
    if kind ~= 'none' and kind ~= want[i] then
      redis.call('DEL', KEYS[i])
      bad[#bad + 1] = KEYS[i]
    end
  end
  return bad
end
"""

ACQUIRE_LEASE = _BAD_KEYS + """
-- KEYS: lease, state, tokens, meta, drafts, verdicts; ARGV: worker, lease ms, session ttl.
-- Returns the new epoch, 0 if not taken, or the keys of a wrong type (their session is ended:
-- the keys are deleted and the state becomes a tombstone, so no verifier serves it again).
local bad = bad_keys()
if #bad > 0 then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'finished', 'invalid_state')
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return bad
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], 'finished') == 1 then
  return 0
end
local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. epoch, 'PX', ARGV[2])
return epoch
"""

CONDEMN_SESSION = _BAD_KEYS + """
-- KEYS: lease, state, tokens, meta, drafts, verdicts; ARGV: reason, ttl.
-- Ends a session whose keys a tenant broke: wrong-typed keys deleted, the lease and the context
-- deleted, the state a tombstone. Returns the keys of a wrong type.
local bad = bad_keys()
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[2], 'finished', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return bad
"""

PASS_ON_OPEN = """
-- KEYS: the tenant's deferred stream (verifiers only), the stream the open was read from.
-- ARGV: payload, hops, first seen (ms), the entry id, the edge's MAC ('' none). Acks and deletes
-- the entry only when the open was written on: an XADD refused (a stream someone else broke)
-- leaves it pending here, and a peer claims it after 2 leases. Returns 1 passed on, or the error.
local fields = {'m', ARGV[1], 'h', ARGV[2], 't', ARGV[3]}
if ARGV[5] ~= '' then
  fields[#fields + 1] = 'a'
  fields[#fields + 1] = ARGV[5]
end
local ok, err = pcall(redis.call, 'XADD', KEYS[1], '*', unpack(fields))
if not ok then return tostring(type(err) == 'table' and err.err or err) end
redis.call('XACK', KEYS[2], 'verifiers', ARGV[4])
redis.call('XDEL', KEYS[2], ARGV[4])
return 1
"""

RENEW_LEASES = """
-- Renews several sessions' leases in one call (their keys in one slot on a cluster).
-- KEYS: lease, state per session; ARGV: lease ms, session ttl, worker, then lease value and its
-- epoch per session. One reply per session: the epoch held (the same: renewed; a new one: taken
-- again when the lease vanished and nobody adopted the session), 0 lost, -1 error.
local function renew(k, a)
  local held = redis.call('GET', KEYS[k + 1])
  if held == ARGV[a] then
    redis.call('PEXPIRE', KEYS[k + 1], ARGV[1])
    return tonumber(ARGV[a + 1])
  end
  if held then return 0 end
  local st = redis.call('HMGET', KEYS[k + 2], 'epoch', 'finished')
  if st[2] then return 0 end
  local stored = tonumber(st[1]) or 0
  if stored > tonumber(ARGV[a + 1]) then return 0 end
  local epoch = math.max(stored, tonumber(ARGV[a + 1])) + 1
  redis.call('HSET', KEYS[k + 2], 'epoch', epoch)
  redis.call('EXPIRE', KEYS[k + 2], ARGV[2])
  redis.call('SET', KEYS[k + 1], ARGV[3] .. '/' .. epoch, 'PX', ARGV[1])
  return epoch
end
local out = {}
for i = 0, #KEYS / 2 - 1 do
  local ok, res = pcall(renew, i * 2, 4 + i * 2)
  out[i + 1] = ok and res or -1
end
return out
"""

RELEASE_LEASE = """
-- KEYS: lease; ARGV: lease value. Deletes the lease only if this owner still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


RENEW_BATCH = 256  # sessions per RENEW_LEASES call


def _epoch(lease: str) -> int:
    return int(lease.rpartition("/")[2] or 0)


def now_ms() -> int:
    return int(time.time() * 1000)


class PoolBroker:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.redis = broker.redis
        keys = broker.keys
        self.leases_key, self.owners_key = keys.leases, keys.owners
        self.workers_key, self.deadletter_key = keys.workers, keys.deadletter
        self.prefix = keys.prefix
        self._admit = self.redis.register_script(ADMIT_SESSION)
        self._refresh = self.redis.register_script(REFRESH_SESSIONS)
        self._take = self.redis.register_script(TAKE_TOKENS)
        self._acquire = self.redis.register_script(ACQUIRE_LEASE)
        self._renew_many = self.redis.register_script(RENEW_LEASES)
        self._release = self.redis.register_script(RELEASE_LEASE)
        self._condemn = self.redis.register_script(CONDEMN_SESSION)
        self._pass_on = self.redis.register_script(PASS_ON_OPEN)

    # ------------------------------------------------------------ leases

    async def acquire(self, sid: str, worker: str, lease_ms: int) -> str | None:
        """Take the session's lease if nobody holds it, with a fresh epoch; registers the deadline.

        Returns the lease value (``worker/epoch``) the owner fences its writes with, or None when
        another worker holds the lease or the session finished (its tombstone).
        """
        reply = await self._acquire(keys=self.session_keys(sid), args=[worker, lease_ms, self.broker.ttl])
        if isinstance(reply, list):
            bad = tuple(text(key) for key in reply)
            raise SessionDataError(f"session {sid!r} had keys of the wrong type (deleted): {', '.join(bad)}",
                                   bad)
        epoch = int(reply)
        if not epoch:
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.leases_key, {sid: now_ms() + lease_ms})
            pipe.hset(self.owners_key, sid, worker)
            await pipe.execute()
        return f"{worker}/{epoch}"

    def session_keys(self, sid: str) -> list[str]:
        """The keys the type-checking scripts take, in SESSION_TYPES order."""
        keys = self.broker.keys
        return [keys.lease(sid), keys.state(sid), keys.tokens(sid), keys.meta(sid), keys.drafts(sid),
                keys.verdicts(sid)]

    async def condemn(self, sid: str, reason: str, ttl_s: int) -> list[str]:
        """End a session whose keys a tenant broke: tombstone, keys of a wrong type deleted, registry
        entries removed. Returns the keys that had a wrong type."""
        await self.forget(sid)  # first: a session whose keys cannot even be tombstoned is not retried
        bad = await self._condemn(keys=self.session_keys(sid), args=[reason, ttl_s])
        return [text(key) for key in bad or []]

    async def renew(self, worker: str, held: dict[str, str], lease_ms: int) -> dict[str, str | None]:
        """Extend the leases this worker holds (``held``: sid -> lease value), one script per slot group.

        A lease that vanished (lapsed while this worker stalled, or Redis lost it) is taken again
        with a new epoch when nobody adopted the session meanwhile and it did not finish: that
        keeps its KV cache. Returns the changes: sid -> the new lease value, or None when lost.
        """
        if not held:
            return {}
        replies = await self._renew_all(worker, held, lease_ms)
        changes: dict[str, str | None] = {}
        kept = []
        for (sid, value), reply in zip(held.items(), replies, strict=True):
            epoch = -1 if isinstance(reply, Exception) else int(reply)
            if epoch == 0 or epoch == -1:
                changes[sid] = None
                continue
            kept.append(sid)
            if epoch != _epoch(value):
                changes[sid] = f"{worker}/{epoch}"
        if kept:
            await self.redis.zadd(self.leases_key, dict.fromkeys(kept, now_ms() + lease_ms))
        return changes

    async def _renew_all(self, worker: str, held: dict[str, str], lease_ms: int) -> list[Any]:
        """RENEW_LEASES once per slot group (one node: per RENEW_BATCH sessions); a reply per session."""
        keys, items = self.broker.keys, list(held.items())
        groups = slot_groups([keys.lease(sid) for sid, _ in items], self.broker.cluster, RENEW_BATCH)
        calls: list[tuple[Any, list[Any], list[Any]]] = []
        for group in groups:
            script_keys: list[Any] = []
            args: list[Any] = [lease_ms, self.broker.ttl, worker]
            for i in group:
                sid, value = items[i]
                script_keys += [keys.lease(sid), keys.state(sid)]
                args += [value, _epoch(value)]
            calls.append((self._renew_many, script_keys, args))
        if self.broker.cluster:
            replies = await run_scripts(self.redis, calls)
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for script, script_keys, args in calls:
                    await script(keys=script_keys, args=args, client=pipe)
                replies = await pipe.execute(raise_on_error=False)
        out: list[Any] = [-1] * len(items)
        for group, reply in zip(groups, replies, strict=True):
            for n, i in enumerate(group):
                out[i] = reply if isinstance(reply, Exception) else reply[n]
        return out

    async def release(self, held: dict[str, str]) -> None:
        """Give up leases (a leaving worker): deadline 0 lets any verifier adopt them at once."""
        keys = self.broker.keys
        for sid, value in held.items():
            if int(await self._release(keys=[keys.lease(sid)], args=[value])):
                await self.redis.zadd(self.leases_key, {sid: 0})

    async def lapsed(self, limit: int = 100) -> list[str]:
        """Sessions whose registered lease deadline has passed."""
        found = await self.redis.zrangebyscore(self.leases_key, "-inf", now_ms(), start=0, num=limit)
        return [text(sid) for sid in found]

    async def forget(self, sid: str) -> None:
        """Remove a finished (or vanished) session from the registry (its lease goes with FINISH)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.leases_key, sid)
            pipe.hdel(self.owners_key, sid)
            await pipe.execute()

    # ------------------------------------------------------------ session meta

    async def save_open(self, sid: str, payload: bytes, tag: bytes) -> None:
        """The open and the edge's MAC of it: an adopting verifier trusts only an open that verifies."""
        key = self.broker.keys.meta(sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"open": payload, "a": tag})
            pipe.expire(key, self.broker.ttl)
            await pipe.execute()

    async def load_open(self, sid: str) -> tuple[bytes | None, bytes | None]:
        """The saved open and its MAC (None for what is missing)."""
        values = await self.redis.hmget(self.broker.keys.meta(sid), ["open", "a"])  # type: ignore[misc]
        raw, tag = (values or [None, None])[:2]
        return (raw if isinstance(raw, bytes) else None), (tag if isinstance(tag, bytes) else None)

    # ------------------------------------------------------------ load registry

    async def publish_load(self, worker: str, load: dict[str, Any]) -> None:
        await self.redis.hset(self.workers_key, worker, json.dumps({**load, "at": time.time()}))

    async def loads(self, fresh_s: float, prune_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Loads of workers that published within ``fresh_s``; entries older than ``prune_s`` go."""
        raw = await self.redis.hgetall(self.workers_key)
        now, live, stale = time.time(), {}, []
        for worker, blob in raw.items():
            load = _load(blob)
            age = now - load["at"]
            if age <= fresh_s:
                live[text(worker)] = load
            elif prune_s is not None and age > prune_s:
                stale.append(worker)
        if stale:
            await self.redis.hdel(self.workers_key, *stale)
        return live

    async def remove_worker(self, worker: str) -> None:
        await self.redis.hdel(self.workers_key, worker)

    # ------------------------------------------------------------ opens, dead letters

    async def pass_on_open(self, entry: Entry, tenant: str, hops: int, since_ms: int) -> bool:
        """Re-queue a session open on the tenant's deferred stream (only verifiers write it), and ack
        and delete this delivery in the same script; False (the entry stays pending) when refused.
        The edge's MAC travels with the open."""
        reply = await self._pass_on(keys=[self.broker.keys.deferred(tenant), entry.stream],
                                    args=[entry.payload or b"", hops, since_ms, entry.entry_id,
                                          entry.mac if entry.mac is not None else b""])
        if reply == 1:
            return True
        log.warning("open.pass_on_refused", stream=entry.stream, entry_id=entry.entry_id, error=text(reply))
        return False

    async def queued_opens(self, tenant: str) -> int:
        """Opens waiting for a tenant, new and deferred (consumed ones are deleted: XLEN counts the rest).

        A key of another type (a tenant's own opens key, without ACLs) counts as empty.
        """
        keys = self.broker.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.opens(tenant))
            pipe.xlen(keys.deferred(tenant))
            lengths = await pipe.execute(raise_on_error=False)
        return sum(int(n) for n in lengths if not isinstance(n, Exception))

    async def expire_untimed(self, pattern: str, ttl_s: int, cursor: int = 0, budget: int = 1000) -> int:
        """Janitor: give keys matching ``pattern`` that have no TTL the session TTL (a tenant's
        streams under its own sessions' pattern, a ghost drafts stream); at most ``budget`` keys per
        call, resumed from ``cursor``. Returns the next cursor (0: the scan went round)."""
        cursor, found = await self.redis.scan(cursor, match=pattern, count=budget)
        if found:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in found:
                    pipe.ttl(key)
                ttls = await pipe.execute()  # a refused TTL (ACL) raises: the caller logs it
            untimed = [key for key, ttl in zip(found, ttls, strict=True) if ttl == -1]
            if untimed:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in untimed:
                        pipe.expire(key, ttl_s)
                    await pipe.execute(raise_on_error=False)
                log.info("janitor.expired_untimed", keys=len(untimed), ttl_s=ttl_s)
        return int(cursor)

    async def dead_letter(self, entry: Entry, error: str, deliveries: int, maxlen: int) -> None:
        """Move a failing message to the dead-letter stream with its error, and ack it.

        One MULTI on one node; on a cluster (two slots) the dead letter lands before the ack.
        """
        async with self.redis.pipeline(transaction=not self.broker.cluster) as pipe:
            pipe.xadd(self.deadletter_key, {FIELD: entry.payload or b"", b"stream": entry.stream,
                                            b"id": entry.entry_id, b"error": error,
                                            b"deliveries": deliveries, b"at": now_ms()},
                      maxlen=maxlen, approximate=True)
            pipe.xack(entry.stream, GROUP, entry.entry_id)
            pipe.xdel(entry.stream, entry.entry_id)
            await pipe.execute()

    async def delivery_counts(self, stream: str, entry_ids: list[str]) -> dict[str, int]:
        """How many times each pending entry was delivered (XPENDING's counter)."""
        if not entry_ids:
            return {}
        rows = await self.redis.xpending_range(stream, GROUP, min=min(entry_ids, key=_id_key),
                                               max=max(entry_ids, key=_id_key), count=len(entry_ids) + 100)
        return {text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    # ------------------------------------------------------------ tenants

    def tenant_sessions_key(self, tenant: str) -> str:
        return self.broker.keys.tenant_sessions(tenant)

    def tenant_bucket_key(self, tenant: str) -> str:
        return self.broker.keys.tenant_bucket(tenant)

    async def admit_session(self, tenant: str, sid: str, limit: int, lifetime_ms: int) -> tuple[bool, int]:
        """Count the session against the tenant's pool-wide limit, atomically; (admitted, count).

        ``limit`` 0 registers it unconditionally (an adopted session, admitted once already). A
        session already counted is admitted again (a duplicated open or an adoption).
        """
        admitted, count = await self._admit(keys=[self.tenant_sessions_key(tenant)],
                                            args=[sid, limit, lifetime_ms])
        return bool(admitted), int(count)

    async def refresh_sessions(self, tenant: str, sids: list[str], lifetime_ms: int) -> None:
        """Extend the entries of the tenant's sessions this worker still owns (lease renewal)."""
        if sids:
            await self._refresh(keys=[self.tenant_sessions_key(tenant)], args=[lifetime_ms, *sids])

    async def leave_session(self, tenant: str, sid: str) -> None:
        """A finished session stops counting against its tenant."""
        await self.redis.zrem(self.tenant_sessions_key(tenant), sid)

    async def take_draft_tokens(self, tenant: str, costs: list[int], rate: float,
                                capacity: float) -> tuple[int, float]:
        """Take the drafts' tokens from the tenant's bucket (pool-wide, refilled at ``rate``/s).

        Returns how many of ``costs`` (a prefix, oldest first) were taken, and the seconds until
        the next one would fit when not all were.
        """
        if not costs:
            return 0, 0.0
        taken, wait_ms = await self._take(keys=[self.tenant_bucket_key(tenant)],
                                          args=[repr(float(rate)), repr(float(capacity)), *costs])
        return int(taken), int(wait_ms) / 1000


_LOAD_NUMBERS = ("at", "sessions", "queue", "resident_tokens", "kv_budget_tokens", "kv_bytes", "load")


def _load(blob: Any) -> dict[str, Any]:
    """A worker's published load, its figures numbers (a malformed entry, written by anyone where
    ACLs do not keep others out, reads as a stale one: pruned, never trusted)."""
    try:
        load = json.loads(blob)
        if not isinstance(load, dict):
            raise ValueError("not a map")
        for name in _LOAD_NUMBERS:
            value = load.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} is not a number")
        tenants = load.get("tenants", {})
        if not isinstance(tenants, dict) or not all(isinstance(n, int) for n in tenants.values()):
            raise ValueError("tenants is not a map of counts")
    except ValueError:
        return {"at": 0.0}
    load["at"] = float(load.get("at", 0))
    return load


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


