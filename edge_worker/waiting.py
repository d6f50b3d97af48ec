"""Waiting for a round's verdict: authenticated entries, non-fatal notices, re-sends, resuming.

Every verdict-stream entry must carry the HMAC of the session's key (common.integrity): others are
dropped, counted (``forged``) and logged. A verdict must name the digest of the very tokens this
edge drafted for its round, and (edge_worker.client) the digest of the context they commit: a
mismatch fails the session with a typed ``integrity`` error, never applying the verdict. A
verifier's ``integrity`` notice reports a draft someone else put in the session's stream (refused
there, never verified): counted (``forged_drafts``) and logged. A non-fatal notice never ends
the session: a rate-limit notice extends the wait, an ``out_of_order`` one with a shorter
committed context makes the edge resume from it (Redis lost rounds). Without a verdict within
the resend budget the same draft is sent again (and the open, while no verifier took the
session). The wait is bounded by the verdict timeout even while Redis is unreachable, and its
error says whether any verifier heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from broker.streams import TRANSIENT_ERRORS, Entry, with_backoff
from common.integrity import ContextDigest, mac_ok, u32
from common.logs import get_logger
from common.wire import ErrorCode, ErrorMessage, Verdict, decode
from edge_worker.backpressure import Backpressure

if TYPE_CHECKING:
    from edge_worker.client import EdgeClient, SessionResult

log = get_logger("specd.edge")


class SessionFailed(Exception):
    """The verifier answered with a typed error, or no verdict came in time."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message  # without the code (printers that show the code apart)


class VerdictWaiter:
    """The verdict-waiting half of an edge session (edge_worker.client._EdgeSession)."""

    client: EdgeClient
    sid: str
    key: bytes
    seq: int
    context: list[int]
    sent: bytes
    sent_tag: bytes
    bound: bytes
    digest: ContextDigest
    open_payload: bytes
    open_tag: bytes
    last_verdict_id: str
    result: SessionResult
    pressure: Backpressure

    async def _await_verdict(self, seq: int) -> Verdict | None:
        """The verdict of ``seq``; None when a notice made the edge resume from the committed state.

        Without a verdict within the resend budget the edge sends the same draft again (the
        verifier drops or answers copies), and the open too while no verifier took the session.
        """
        config = self.client.config
        deadline = time.monotonic() + config.verdict_timeout_s
        resend_at = time.monotonic() + config.resend_s
        while (left := deadline - time.monotonic()) > 0:
            block = max(0.001, min(left, resend_at - time.monotonic(), 1.0))
            try:  # bounded even while Redis is unreachable: the session fails clearly, never hangs
                entries = await asyncio.wait_for(with_backoff(lambda: self.client.broker.read_verdicts(
                    self.sid, self.last_verdict_id, int(block * 1000) or 1), "read_verdicts"),  # noqa: B023
                    left + 1.0)
            except asyncio.TimeoutError:
                break
            for entry in entries:
                self.last_verdict_id = entry.entry_id
                outcome = self._on_entry(entry, seq)
                if outcome == "wait":
                    deadline = time.monotonic() + config.verdict_timeout_s
                elif outcome == "resumed":
                    return None
                elif isinstance(outcome, Verdict):
                    return outcome
            if time.monotonic() >= resend_at:
                await self._resend(seq)
                resend_at = time.monotonic() + config.resend_s
        forged = "" if not self.result.forged else (
            f"; {self.result.forged} verdict-stream entries failed authentication (do edges and "
            "verifiers share redis.verdict_secret and the same specd release?)")
        raise SessionFailed(ErrorCode.INTERNAL, f"no verdict for seq {seq} within {config.verdict_timeout_s}s"
                            f" ({self.result.resends} re-sends): {await self._why_no_verdict()}{forged}")

    async def _why_no_verdict(self) -> str:
        """Tell a dead pool (no verifier heartbeat) from a slow or unserving one, where Redis says."""
        try:
            alive = await asyncio.wait_for(self.client.broker.any_healthy("verifier"), 2.0)
        except Exception:  # noqa: BLE001 - no SCAN under an edge ACL, or Redis away: cannot tell
            return f"is a verifier running for tenant {self.client.config.tenant!r}? `specd verifier --check`"
        if not alive:
            return "no verifier is alive (no verifier heartbeat in Redis): start `specd verifier`"
        return (f"verifiers are alive but none answered: the pool is overloaded, or serves no tenant "
                f"{self.client.config.tenant!r} ([tenants] names, pool.tenant_scan_ms)")

    def _on_entry(self, entry: Entry, seq: int) -> Verdict | str | None:
        """One verdict-stream entry: the awaited verdict, "wait" (held back), "resumed", or None (skip)."""
        if not mac_ok(self.key, entry.payload or b"", entry.mac):
            self.result.forged += 1  # not from a verifier of this session: never trusted
            log.warning("edge.verdict_unauthenticated", session_id=self.sid, entry_id=entry.entry_id)
            return None
        message = decode(entry.payload or b"")
        if isinstance(message, ErrorMessage):
            if self._held_back(message):
                return "wait"
            if message.fatal:
                raise SessionFailed(message.code, message.message)
            if message.code is ErrorCode.INTEGRITY:
                self._forged_draft_reported(message)
                return None
            return "resumed" if self._resume(message) else None
        if isinstance(message, Verdict) and message.seq == seq:
            if message.drafted != self.bound:  # it verified tokens this edge did not draft
                self._integrity_failure(f"the verdict of seq {seq} verified other tokens than this edge "
                                        "drafted")
            self.pressure.observe(message.pool_load)
            return message
        return None  # an older verdict replayed after a redelivery or a re-send: already applied

    def _forged_draft_reported(self, message: ErrorMessage) -> None:
        """The verifier refused a draft in this session's stream that this edge did not write."""
        self.result.forged_drafts += 1
        self.client.metrics.error(ErrorCode.INTEGRITY.value)
        log.warning("edge.draft_forged", session_id=self.sid, seq=message.seq, error=message.message)

    def _integrity_failure(self, what: str) -> None:
        """A verdict that authenticates but does not match this edge's round: never applied."""
        log.error("edge.verdict_mismatch", session_id=self.sid, seq=self.seq, error=what)
        raise SessionFailed(ErrorCode.INTEGRITY, f"{what}: not applied (a draft injected by a holder of "
                            "the secret, or a verifier that lost and redid rounds differently)")

    async def _resend(self, seq: int) -> None:
        broker = self.client.broker
        self.result.resends += 1
        log.info("edge.resend", session_id=self.sid, seq=seq)
        try:
            if self.result.rounds == 0 and not await broker.session_known(self.sid):
                await broker.open_session(self.sid, self.open_payload, self.open_tag)  # the open was lost
            await broker.send_draft(self.sid, self.sent, self.sent_tag)
        except TRANSIENT_ERRORS as exc:  # Redis away: the verdict deadline bounds the session
            log.warning("edge.resend_failed", session_id=self.sid, error=str(exc))

    def _resume(self, message: ErrorMessage) -> bool:
        """A non-fatal notice; an ``out_of_order`` one with a shorter committed context rewinds.

        Redis lost rounds that this edge had already seen verdicts of (it restarted and a new
        owner rebuilt the session from what persisted): go back to the committed length and seq;
        the redone rounds must give the tokens already emitted (checked in ``_accept``).
        """
        log.info("edge.notice", session_id=self.sid, code=message.code.value, error=message.message)
        committed = message.committed
        if (message.code is not ErrorCode.OUT_OF_ORDER or not committed or message.seq >= self.seq
                or not len(self.result.prompt_ids) <= committed < len(self.context)):
            return False
        self.context = self.context[:committed]
        self.digest = ContextDigest(u32(self.context))
        self.result.token_ids = self.context[len(self.result.prompt_ids):]
        self.seq = message.seq
        self.result.rewinds += 1
        log.warning("edge.rewound", session_id=self.sid, committed=committed, seq=message.seq)
        return True

    def _held_back(self, message: ErrorMessage) -> bool:
        """A non-fatal rate-limit notice: the draft waits for the tenant's bucket, the session goes on.

        The verdict comes later (the verdict timeout starts again) and the next drafts are shorter.
        """
        if message.fatal or message.code is not ErrorCode.TENANT_LIMIT:
            return False
        self.pressure.throttle(message.retry_after_s)
        self.result.throttled += 1
        log.info("edge.draft_throttled", session_id=self.sid, seq=message.seq,
                 retry_after_s=message.retry_after_s)
        return True
