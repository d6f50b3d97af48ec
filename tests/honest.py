"""Tests that hand-craft opens and drafts send them as an honest edge would: with their MACs.

``HonestBroker`` signs every open and draft it sends under the session's key (common.integrity),
derived from ``secret`` (the verifier's ``redis.verdict_secret``, empty in these tests) and the
nonce of the session's open (remembered from the opens it sent; empty when it sent none).
"""

from __future__ import annotations

from broker.streams import FIELD, MAC_FIELD, Broker, Keys
from common.integrity import mac, session_key
from common.wire import SessionOpen, WireError, decode

_NONCES: dict[str, bytes] = {}  # sid -> nonce of the last open sent for it (any HonestBroker)


class HonestBroker(Broker):
    secret = ""

    async def open_session(self, sid: str, payload: bytes, tag: bytes | None = None) -> None:
        await super().open_session(sid, payload, open_tag(payload, self.secret) if tag is None else tag)

    async def send_draft(self, sid: str, payload: bytes, tag: bytes | None = None) -> str:
        tag = draft_tag(sid, payload, self.secret) if tag is None else tag
        return await super().send_draft(sid, payload, tag)


def open_tag(payload: bytes, secret: str = "") -> bytes | None:
    """The MAC an honest edge puts beside this open (None: not an open at all)."""
    try:
        message = decode(payload)
    except WireError:
        return None
    if not isinstance(message, SessionOpen):
        return None
    _NONCES[message.session_id] = message.nonce
    return mac(session_key(secret, message.session_id, message.nonce), payload)


def draft_tag(sid: str, payload: bytes, secret: str = "") -> bytes:
    """The MAC an honest edge puts beside a draft or close of session ``sid``."""
    return mac(session_key(secret, sid, _NONCES.get(sid, b"")), payload)


def entry_tag(keys: Keys, stream: str, payload: bytes | None) -> bytes | None:
    """The MAC an honest edge puts beside ``payload`` on ``stream`` (an open or a draft stream)."""
    if payload is None:
        return None
    if keys.tenant_of_opens(stream) is not None:
        return open_tag(payload)
    return draft_tag(keys.session_of(stream), payload)


def honest(broker: Broker) -> HonestBroker:
    """The same connection, prefix and limits, sending signed messages."""
    return HonestBroker(broker.redis, broker.keys.prefix, broker.maxlen, broker.ttl, broker.keys.shards)


def signed_open(payload: bytes) -> dict[bytes, bytes]:
    """An open's stream entry as an honest edge writes it: the payload and its MAC."""
    tag = open_tag(payload)
    assert tag is not None, "not an open"
    return {FIELD: payload, MAC_FIELD: tag}
