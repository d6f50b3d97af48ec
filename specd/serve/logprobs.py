"""Per-token logprobs in OpenAI's two shapes (pure: the tokenizer is passed in).

The figures are the target's log-probabilities of each generated token and its most likely
alternatives, computed by the verifier in the forward pass that committed the token: log-softmax
of the raw logits, i.e. of the temperature-1 distribution before top-k/top-p (as OpenAI and vLLM
report them), whatever temperature the request samples with.

* completions (``logprobs: n``): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``;
  each ``top_logprobs`` entry maps the n most likely tokens, plus the chosen one (OpenAI: "up to
  logprobs + 1 elements"), to their logprobs; ``text_offset`` counts characters of the completion.
* chat (``logprobs: true, top_logprobs: n``): ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}``.

A token's text is its own decoding (a piece of a multi-byte character shows as U+FFFD; ``bytes``
are that text's UTF-8), or ``token_id:N`` with ``return_tokens_as_token_ids`` (vLLM's extension).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_worker.client import TokenLogprob


class LogprobFormat:
    def __init__(self, tokenizer: Any, as_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._names: dict[int, str] = {}
        self.offset = 0  # characters of the completion's tokens so far (text_offset)

    def name(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        if token not in self._names:
            self._names[token] = str(self.tokenizer.decode([token], skip_special_tokens=False))
        return self._names[token]

    def completion(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        names = [self.name(e.token) for e in entries]
        offsets = []
        for name in names:
            offsets.append(self.offset)
            self.offset += len(name)
        return {"tokens": names, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._top_map(e) for e in entries], "text_offset": offsets}

    def _top_map(self, entry: TokenLogprob) -> dict[str, float]:
        top = {self.name(token): logprob for token, logprob in entry.top}
        top.setdefault(self.name(entry.token), entry.logprob)
        return top

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        item: Callable[[int, float], dict[str, Any]] = lambda token, logprob: {  # noqa: E731
            "token": self.name(token), "logprob": logprob, "bytes": list(self.name(token).encode())}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def of(self, kind: str, entries: list[TokenLogprob]) -> dict[str, Any]:
        return self.completion(entries) if kind == "completion" else self.chat(entries)
