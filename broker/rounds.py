"""Fenced session writes: a verifier writes a session's keys only while it holds the session's lease.

Every write a session's owner makes (a round's commit, a notice, the end of the session) is one
Lua script on the session's own keys (one hash tag: one Redis Cluster slot) that first checks
the lease holds this worker's ``worker/epoch`` value; a round's commits for many sessions are
one script call per slot group (COMMIT_ROUNDS), each session still checked and answered alone.
A verifier that lost its lease (stalled, partitioned, or Redis lost the key) therefore cannot
publish, commit or delete anything for a session that a new owner serves: its script answers
``FENCED`` and it drops the session.

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

from broker.cluster import run_scripts, slot_groups
from broker.streams import GROUP, Broker, SessionDataError

FENCED = -1
DONE = -2

COMMIT_ROUNDS = """
-- Commits several sessions' rounds in one call (their keys in one slot on a cluster).
-- KEYS: 6 per session: lease, state, tokens, verdicts, drafts, meta.
-- ARGV: ttl, maxlen, then 8 per session: lease value, expected stored bytes, bytes, next_seq,
-- verdict payload, MAC, draft entry ('' none), full.
-- One reply per session: -2 done, -1 fenced, the stored length, or 'E<error>' (a key of the
-- wrong type: that session fails, the others commit).
local ttl, maxlen = ARGV[1], ARGV[2]
local function commit(k, a)
  if redis.call('GET', KEYS[k + 1]) ~= ARGV[a] then return -1 end
  local have = redis.call('STRLEN', KEYS[k + 3])
  local before = tonumber(ARGV[a + 1])
  if ARGV[a + 7] == '1' then
    redis.call('SET', KEYS[k + 3], ARGV[a + 2])
  elseif have == before then
    redis.call('APPEND', KEYS[k + 3], ARGV[a + 2])
  elseif have ~= before + string.len(ARGV[a + 2]) then
    return have
  end
  redis.call('HSET', KEYS[k + 2], 'next_seq', ARGV[a + 3], 'last_verdict', ARGV[a + 4],
             'last_mac', ARGV[a + 5])
  redis.call('XADD', KEYS[k + 4], 'MAXLEN', '~', maxlen, '*', 'm', ARGV[a + 4], 'a', ARGV[a + 5])
  if ARGV[a + 6] ~= '' then
    redis.call('XACK', KEYS[k + 5], 'verifiers', ARGV[a + 6])
    redis.call('XDEL', KEYS[k + 5], ARGV[a + 6])
  end
  for i = 2, 6 do redis.call('EXPIRE', KEYS[k + i], ttl) end
  return -2
end
local out = {}
for i = 0, #KEYS / 6 - 1 do
  local ok, res = pcall(commit, i * 6, 3 + i * 8)
  if ok then out[i + 1] = res else out[i + 1] = 'E' .. tostring(type(res) == 'table' and res.err or res) end
end
return out
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


BATCH_SESSIONS = 64  # sessions per COMMIT_ROUNDS call: bounds how long one script holds Redis


class RoundWriter:
    """The fenced scripts of one broker; a round's commits are one script per slot group."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        redis = broker.redis
        self._commit_many = redis.register_script(COMMIT_ROUNDS)
        self._notice = redis.register_script(PUBLISH_NOTICE)
        self._finish = redis.register_script(FINISH_SESSION)

    async def commit(self, commits: list[Commit]) -> list[int | Exception]:
        """Commit rounds, one script per slot group; per session DONE, FENCED, the stored length, or
        an error.

        Errors are per session (a hostile edge may have replaced one of its own keys with a
        value of another type): they never fail the other sessions' commits. The commands do not
        grow with the sessions: one per slot group (a cluster) or per ``BATCH_SESSIONS`` (one node).
        """
        if not commits:
            return []
        groups = self._groups(commits)
        # As plain EVALSHA commands, on one node too: a pipeline of redis-py Script objects asks
        # SCRIPT EXISTS first, one more round trip between every forward pass and its verdicts.
        replies = await run_scripts(self.broker.redis, [self._call(commits, group) for group in groups])
        out: list[int | Exception] = [0] * len(commits)
        for group, reply in zip(groups, replies, strict=True):
            for n, i in enumerate(group):
                out[i] = reply if isinstance(reply, Exception) else _item(reply[n])
        return out

    def _groups(self, commits: list[Commit]) -> list[list[int]]:
        """Indices of the commits, by slot (one node: all in one), at most BATCH_SESSIONS each."""
        return slot_groups([self.broker.keys.state(c.session_id) for c in commits], self.broker.cluster,
                           BATCH_SESSIONS)

    def _call(self, commits: list[Commit], group: list[int]) -> tuple[Any, list[Any], list[Any]]:
        keys, script_keys = self.broker.keys, []
        args: list[Any] = [self.broker.ttl, self.broker.maxlen]
        for i in group:
            c, sid = commits[i], commits[i].session_id
            script_keys += [keys.lease(sid), keys.state(sid), keys.tokens(sid), keys.verdicts(sid),
                            keys.drafts(sid), keys.meta(sid)]
            args += [c.lease, c.stored_bytes, c.tokens, c.next_seq, c.payload, c.mac, c.ack_id,
                     "1" if c.full else "0"]
        return self._commit_many, script_keys, args

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


def _item(value: Any) -> int | Exception:
    """One session's reply inside COMMIT_ROUNDS' answer: an int, or ``E<error>``."""
    if isinstance(value, bytes | str):
        text = value.decode() if isinstance(value, bytes) else value
        return SessionDataError(text[1:]) if text.startswith("E") else int(text)
    return _reply(value)
