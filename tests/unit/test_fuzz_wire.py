"""Property-based fuzzing of every wire schema (hypothesis), and no unsafe deserialisation anywhere.

For each schema: valid messages round-trip exactly; and at least 2,000 malformed, truncated,
oversized, bit-flipped and adversarially edited payloads either decode to a message that itself
round-trips, or raise ``WireError``: never anything else.
"""

from __future__ import annotations

import ast
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.wire import (
    SCHEMA_VERSION,
    DraftBatch,
    ErrorCode,
    ErrorMessage,
    Limits,
    Message,
    SamplingSpec,
    SessionClose,
    SessionOpen,
    Verdict,
    WireError,
    decode,
    encode,
)

VOCAB = 320
LIMITS = Limits(max_message_bytes=16384, max_prompt_tokens=64, max_new_tokens=512, max_gamma=8,
                max_support=12, vocab_size=VOCAB)
PER_SCHEMA = 2000
FUZZ_SETTINGS = settings(max_examples=45, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))

sids = st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True)
texts = st.text(max_size=40)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
token = st.integers(0, VOCAB - 1)


def u32(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.uint32)


@st.composite
def sampling_specs(draw: Any) -> SamplingSpec:
    return SamplingSpec(
        temperature=draw(st.floats(0, 100)), top_p=draw(st.floats(0.01, 1.0)),
        top_k=draw(st.integers(0, 1000)), seed=draw(st.integers(0, (1 << 63) - 1)),
        max_new_tokens=draw(st.integers(1, LIMITS.max_new_tokens)),
        stop_token_ids=tuple(draw(st.lists(token, max_size=4))))


@st.composite
def opens(draw: Any, sid: Any = sids) -> SessionOpen:
    return SessionOpen(draw(sid), u32(draw(st.lists(token, min_size=1, max_size=LIMITS.max_prompt_tokens))),
                       draw(sampling_specs()), draw(texts), draw(st.text(max_size=32)),
                       tenant=draw(st.text(max_size=20)), target_model=draw(texts))


@st.composite
def draft_arrays(draw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, support sizes, support ids, support probs): greedy (no support) or sampled."""
    tokens = draw(st.lists(token, max_size=LIMITS.max_gamma))
    if not tokens or draw(st.booleans()):
        return u32(tokens), np.zeros(0, np.uint16), u32([]), np.zeros(0, np.float32)
    sizes, ids, probs = [], [], []
    for drafted in tokens:
        support = draw(st.sets(token, max_size=LIMITS.max_support - 1)) - {drafted}
        chosen = [drafted, *sorted(support)]
        sizes.append(len(chosen))
        ids += chosen
        weights = st.floats(2.0**-100, 1.0, width=32)
        probs += draw(st.lists(weights, min_size=len(chosen), max_size=len(chosen)))
    return u32(tokens), np.asarray(sizes, np.uint16), u32(ids), np.asarray(probs, np.float32)


@st.composite
def drafts(draw: Any, sid: Any = sids) -> DraftBatch:
    tokens, sizes, ids, probs = draw(draft_arrays())
    return DraftBatch(draw(sid), draw(st.integers(0, 1 << 40)), draw(st.integers(1, 1 << 30)), tokens, sizes,
                      ids, probs, sent_at=draw(finite), draft_ms=draw(finite))


@st.composite
def verdicts(draw: Any, sid: Any = sids) -> Verdict:
    return Verdict(draw(sid), draw(st.integers(0, 1 << 40)), draw(st.integers(0, LIMITS.max_gamma)),
                   draw(token), draw(st.integers(1, 1 << 30)),
                   draw(st.sampled_from([None, "stop", "length"])),
                   draw(finite), draw(finite), draw(st.integers(0, 64)), draw(st.text(max_size=30)))


@st.composite
def errors(draw: Any, sid: Any = sids) -> ErrorMessage:
    return ErrorMessage(draw(sid), draw(st.sampled_from(list(ErrorCode))), draw(st.text(max_size=100)),
                        draw(st.integers(-1, 1 << 40)), draw(st.booleans()))


@st.composite
def closes(draw: Any, sid: Any = sids) -> SessionClose:
    return SessionClose(draw(sid), draw(st.text(max_size=30)))


SCHEMAS: dict[str, Callable[..., Any]] = {
    "open": opens, "draft": drafts, "verdict": verdicts, "error": errors, "close": closes}

# Anything msgpack can carry: what an adversary can put in a field.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


KINDS = ("truncate", "flip", "edit", "drop", "add", "oversize", "random", "nested", "retype", "none")


def corrupt(rnd: random.Random, raw: bytes, values: list[Any]) -> bytes | None:
    """One hostile variant of a valid encoding (None: an entry without a payload field).

    ``rnd`` and the adversarial ``values`` come from hypothesis, so a failure replays; the edits
    themselves are plain Python, so thousands of payloads cost little.
    """
    kind = rnd.choice(KINDS)
    if kind == "truncate":
        return raw[: rnd.randrange(len(raw))]
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        return bytes(data)
    if kind == "random":
        return rnd.randbytes(rnd.randrange(256))
    if kind == "none":
        return None
    body = msgpack.unpackb(raw, raw=False)
    return msgpack.packb(_edit(rnd, body, kind, values), use_bin_type=True)


def _edit(rnd: random.Random, body: dict[str, Any], kind: str, values: list[Any]) -> Any:
    key = rnd.choice(sorted(body))
    if kind == "edit":
        body[key] = rnd.choice(values)
    elif kind == "drop":
        body.pop(key)
    elif kind == "add":
        body[f"x{rnd.randrange(100)}"] = rnd.choice(values)
    elif kind == "retype":  # the right content in the wrong shape: odd lengths, text for bytes
        value = body[key]
        body[key] = (value.decode("latin-1") if rnd.random() < 0.5 else value[:-1]) \
            if isinstance(value, bytes) else [value]
    elif kind == "nested" and isinstance(body.get("sampling"), dict):
        body["sampling"][rnd.choice(sorted(body["sampling"]))] = rnd.choice(values)
    elif kind == "oversize":
        body[rnd.choice(["prompt", "tokens", "sup_ids", "sizes", "sid", "message", "reason", key])] = \
            _oversized(rnd)
    else:
        return rnd.choice(values)  # not even a map
    return body


def _oversized(rnd: random.Random) -> Any:
    choice = rnd.randrange(4)
    if choice == 0:  # more ids than any limit
        return u32([1] * rnd.randint(LIMITS.max_prompt_tokens + 1, 2000)).tobytes()
    if choice == 1:  # beyond max_message_bytes
        return b"\x01" * (LIMITS.max_message_bytes + rnd.randint(1, 100))
    if choice == 2:  # ids outside the vocabulary
        return u32([VOCAB + rnd.randrange(1 << 20)] * 2).tobytes()
    return "x" * rnd.randint(129, 5000)


@st.composite
def hostile_batches(draw: Any, schema: str, count: int = 50) -> list[bytes | None]:
    """``count`` hostile payloads derived from one valid message of ``schema``."""
    raw = encode(draw(SCHEMAS[schema]()))
    values = draw(st.lists(msgpack_values, min_size=4, max_size=4))
    rnd = draw(st.randoms(use_true_random=False))
    return [corrupt(rnd, raw, values) for _ in range(count)]


def comparable(message: Message) -> Any:
    """A structure comparing equal when two messages carry the same content (arrays as lists)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else comparable(v) if dataclasses.is_dataclass(v)
                else v) for k, v in vars(message).items()}


def check_payload(raw: bytes | None) -> Message | None:
    """The fuzz property: WireError or a message that round-trips; anything else fails the test."""
    try:
        message = decode(raw, LIMITS)  # type: ignore[arg-type]  # None is an adversarial payload too
    except WireError:
        return None
    assert comparable(decode(encode(message), LIMITS)) == comparable(message)
    return message


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_valid_messages_round_trip(schema: str) -> None:
    @settings(max_examples=60, deadline=None, database=None)
    @given(SCHEMAS[schema]())
    def run(message: Message) -> None:
        assert comparable(decode(encode(message), LIMITS)) == comparable(message)

    run()


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_hostile_payloads_raise_only_wire_error(schema: str) -> None:
    seen = {"payloads": 0, "rejected": 0}

    @FUZZ_SETTINGS
    @given(hostile_batches(schema))
    def run(payloads: list[bytes | None]) -> None:
        for payload in payloads:
            seen["payloads"] += 1
            seen["rejected"] += check_payload(payload) is None

    run()
    assert seen["payloads"] >= PER_SCHEMA and seen["rejected"] > seen["payloads"] // 4, seen


def test_size_limits_are_enforced_before_any_array_work() -> None:
    huge = {"v": SCHEMA_VERSION, "t": "draft", "sid": "s", "tokens": b"\x00" * 4 * (LIMITS.max_gamma + 1)}
    with pytest.raises(WireError) as info:
        decode(msgpack.packb(huge), LIMITS)
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(WireError) as info:
        decode(b"\x00" * (LIMITS.max_message_bytes + 1), LIMITS)
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    deep = b"\x91" * 100_000 + b"\x00"  # [[[[...]]]]: msgpack's own nesting limit, not a crash
    with pytest.raises(WireError):
        decode(deep, Limits())


UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "jsonpickle", "cloudpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_marshal_or_eval_in_the_package() -> None:
    """Messages are msgpack with typed fields only: nothing in the package can run what it reads."""
    root = Path(__file__).resolve().parents[2]
    found = []
    for package in ("common", "broker", "edge_worker", "verifier_worker", "specd"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                found += [f"{path.name}:{node.lineno}" for name in _unsafe(node)]
    assert not found, f"unsafe deserialisation or evaluation: {found}"
    source = (root / "common" / "wire.py").read_text()
    assert "ext_hook" not in source and "object_hook" not in source  # plain msgpack types only


def _unsafe(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if (node.module or "").split(".")[0] in UNSAFE_MODULES else []
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in UNSAFE_CALLS:
        return [node.func.id]
    if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and \
            isinstance(node.value, ast.Name) and node.value.id in ("torch", "numpy", "np"):
        return [f"{node.value.id}.{node.attr}"]
    return []
