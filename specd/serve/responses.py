"""OpenAI response objects and server-sent-event chunks (``data: {json}\\n\\n``, then ``[DONE]``).

Speculation figures ride in a ``specd`` field that standard clients ignore: per chunk the round's
spans (accepted draft text apart from the verifier's token), per response the session's totals.
"""

from __future__ import annotations

import json
import time
from typing import Any

from specd.serve.schemas import Generation
from specd.serve.text import Delta

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def response_id(generation: Generation, session_id: str) -> str:
    return ("cmpl-" if generation.kind == "completion" else "chatcmpl-") + session_id


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(generation: Generation, rid: str, created: int, chunk: bool) -> dict[str, Any]:
    if generation.kind == "completion":
        kind = "text_completion"
    else:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    return {"id": rid, "object": kind, "created": created, "model": generation.model,
            "system_fingerprint": None}


def full_response(generation: Generation, rid: str, text: str, finish: str,
                  used: dict[str, int], figures: dict[str, Any],
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    body = _envelope(generation, rid, int(time.time()), chunk=False)
    if generation.kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": finish}
    return {**body, "choices": [choice], "usage": used, "specd": figures}


class ChunkWriter:
    """The chunks of one streamed response, in order."""

    def __init__(self, generation: Generation, rid: str) -> None:
        self.generation = generation
        self.rid = rid
        self.created = int(time.time())

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None, extra: dict[str, Any],
               logprobs: dict[str, Any] | None = None) -> bytes:
        body = _envelope(self.generation, self.rid, self.created, chunk=True)
        if self.generation.kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": delta, "logprobs": logprobs,
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**body, "choices": [choice], **extra})

    def start(self) -> bytes:
        """Chat streams open with the assistant role (OpenAI's first chunk); completions with nothing."""
        if self.generation.kind == "completion":
            return b""
        return self._chunk({"role": "assistant", "content": ""}, None, {})

    def delta(self, delta: Delta, round_figures: dict[str, Any],
              logprobs: dict[str, Any] | None = None) -> bytes:
        content: dict[str, Any] | str = delta.text if self.generation.kind == "completion" else {
            "content": delta.text}
        return self._chunk(content, None, {"specd": {**round_figures, "spans": delta.spans}}, logprobs)

    def finish(self, finish: str, used: dict[str, int], figures: dict[str, Any]) -> bytes:
        empty: dict[str, Any] | str = "" if self.generation.kind == "completion" else {}
        last = self._chunk(empty, finish, {"specd": figures})
        if self.generation.include_usage:
            body = _envelope(self.generation, self.rid, self.created, chunk=True)
            last += sse({**body, "choices": [], "usage": used})
        return last + DONE

    def error(self, body: dict[str, Any]) -> bytes:
        """An error after the stream began (the status line is already sent): OpenAI's form."""
        return sse(body) + DONE
