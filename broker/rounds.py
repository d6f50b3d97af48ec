"""Fenced session writes: a verifier writes a session's keys only while it holds the session's lease.

Every write a session's owner makes (a round's commit, a notice, the end of the session) is one
Lua script on the session's own keys (one hash tag: one Redis Cluster slot) that first checks
the lease holds this worker's ``worker/epoch`` value. A verifier that lost its lease (stalled,
partitioned, or Redis lost the key) therefore cannot publish, commit or delete anything for a
session that a new owner serves: its script answers ``FENCED`` and it drops the session.

A round's commit appends only the round's new tokens to ``{sid}:tokens`` (APPEND of uint32 LE:
the cost of a round does not grow with the session) when the stored length is the one the
owner expects. A stored context shorter than expected (Redis restarted and lost the last
writes) is answered with its length, and the owner rewrites it whole (``full``); a longer one
means the owner's memory is stale (another owner committed meanwhile) and it drops the session.
A retried commit whose first attempt landed (lost reply) finds its tokens there and applies the
rest again, which is idempotent: the same verdict twice is skipped by the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from broker.cluster import run_scripts
from broker.streams import GROUP, Broker

FENCED = -1
DONE = -2

COMMIT_ROUND = """
-- KEYS: lease, state, tokens, verdicts, drafts, meta
-- ARGV: lease value, expected stored bytes, bytes to append (or the whole context when full),
--       next_seq, verdict payload, its MAC, draft entry to ack ('' none), ttl, maxlen, full ('1')
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local have = redis.call('STRLEN', KEYS[3])
local before = tonumber(ARGV[2])
if ARGV[10] == '1' then
  redis.call('SET', KEYS[3], ARGV[3])
elseif have == before then
  redis.call('APPEND', KEYS[3], ARGV[3])
elseif have ~= before + string.len(ARGV[3]) then
  return have
end
redis.call('HSET', KEYS[2], 'next_seq', ARGV[4], 'last_verdict', ARGV[5], 'last_mac', ARGV[6])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'm', ARGV[5], 'a', ARGV[6])
if ARGV[7] ~= '' then
  redis.call('XACK', KEYS[5], 'verifiers', ARGV[7])
  redis.call('XDEL', KEYS[5], ARGV[7])
end
for i = 2, 6 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
return -2
"""

PUBLISH_NOTICE = """
-- KEYS: lease, verdicts, drafts; ARGV: lease value, payload, MAC, entry to ack ('' none), maxlen, ttl
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'm', ARGV[2], 'a', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[4] ~= '' then
  redis.call('XACK', KEYS[3], 'verifiers', ARGV[4])
  redis.call('XDEL', KEYS[3], ARGV[4])
end
return -2
"""

FINISH_SESSION = """
-- KEYS: lease, state, drafts, tokens, meta, verdicts; ARGV: lease value, finished ttl, reason
-- The state hash becomes a tombstone (``finished``) so a late duplicate open or a stale owner's
-- retake cannot bring the session back.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HSET', KEYS[2], 'finished', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[6], ARGV[2])
return -2
"""


@dataclass
class Commit:
    """One session's round, ready for its fenced commit."""

    session_id: str
    lease: str  # the owner's ``worker/epoch``
    stored_bytes: int  # committed context length before the round, in bytes
    tokens: bytes  # the round's new tokens (or the whole context when ``full``)
    next_seq: int
    payload: bytes  # the encoded verdict
    mac: bytes
    ack_id: str
    full: bool = False


class RoundWriter:
    """The fenced scripts of one broker; every method is one command per session."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        redis = broker.redis
        self._commit = redis.register_script(COMMIT_ROUND)
        self._notice = redis.register_script(PUBLISH_NOTICE)
        self._finish = redis.register_script(FINISH_SESSION)

    async def commit(self, commits: list[Commit]) -> list[int | Exception]:
        """Commit rounds in one pipeline; per session DONE, FENCED, the stored length, or an error.

        Errors are per session (a hostile edge may have replaced one of its own keys with a
        value of another type): they never fail the other sessions' commits.
        """
        if not commits:
            return []
        keys, ttl, maxlen = self.broker.keys, self.broker.ttl, self.broker.maxlen
        calls: list[tuple[Any, list[Any], list[Any]]] = [(self._commit,
                  [keys.lease(c.session_id), keys.state(c.session_id), keys.tokens(c.session_id),
                   keys.verdicts(c.session_id), keys.drafts(c.session_id), keys.meta(c.session_id)],
                  [c.lease, c.stored_bytes, c.tokens, c.next_seq, c.payload, c.mac, c.ack_id,
                   ttl, maxlen, "1" if c.full else "0"]) for c in commits]
        if self.broker.cluster:
            return [_reply(r) for r in await run_scripts(self.broker.redis, calls)]
        async with self.broker.redis.pipeline(transaction=False) as pipe:
            for script, script_keys, args in calls:
                await script(keys=script_keys, args=args, client=pipe)
            replies = await pipe.execute(raise_on_error=False)
        return [_reply(r) for r in replies]

    async def notice(self, sid: str, lease: str, payload: bytes, tag: bytes, ack_id: str = "") -> bool:
        """Publish an error or notice to the session's edge (and ack the entry); False if fenced."""
        keys = self.broker.keys
        reply = await self._notice(keys=[keys.lease(sid), keys.verdicts(sid), keys.drafts(sid)],
                                   args=[lease, payload, tag, ack_id, self.broker.maxlen, self.broker.ttl])
        return int(reply) == DONE

    async def finish(self, sid: str, lease: str, finished_ttl_s: int, reason: str) -> bool:
        """Delete the session's keys, leave a tombstone and shorten the verdicts' TTL; False if fenced."""
        keys = self.broker.keys
        try:
            reply = await self._finish(keys=[keys.lease(sid), keys.state(sid), keys.drafts(sid),
                                             keys.tokens(sid), keys.meta(sid), keys.verdicts(sid)],
                                       args=[lease, finished_ttl_s, reason])
        except ResponseError:
            return False  # a key of the wrong type (a hostile edge): it expires with its TTL
        return int(reply) == DONE

    async def ack_foreign(self, stream: str, entry_id: str) -> None:
        """Ack and delete a draft-stream entry without publishing (a session this worker lost)."""
        async with self.broker.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            await pipe.execute()


def _reply(value: Any) -> int | Exception:
    return value if isinstance(value, Exception) else int(value)
