"""OpenAI request bodies -> one validated ``Generation`` (pure: the tokenizer is passed in).

Fields OpenAI's clients send that change nothing here (``user``, ``logit_bias`` when empty, ...)
are ignored; fields whose non-default values this server cannot honour (``n`` > 1, penalties,
``echo``) get a 400 naming them rather than a silent wrong answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specd.serve.errors import APIError, invalid, unknown_model

BUNDLED_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}\n"
    "{% else %}\"\"\"{{ m['content'] }}\"\"\"\n{% endif %}{% endfor %}"
)
"""For tokenizers without a chat template (the bundled pair, a tiny Python code model): each
request (system or user) becomes a docstring line, each answer the code after it."""

MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs (common.wire.MAX_TOP_LOGPROBS)
MAX_SEED = (1 << 63) - 1


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 31)  # extension (vLLM's name)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=16)  # extension (vLLM's): ends on a token
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    return_tokens_as_token_ids: bool = False  # extension (vLLM's): logprobs name tokens "token_id:N"


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Literal[False] = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token
    best_of: int = Field(1, ge=1, le=1)
    suffix: None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: None = None


@dataclass(frozen=True)
class Defaults:
    """Server-side values: the settings' sampling defaults and limits."""

    model: str
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    max_tokens_limit: int
    context_tokens: int
    prompt_tokens_limit: int


@dataclass(frozen=True)
class Generation:
    kind: Literal["completion", "chat"]
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: no logprobs; n: each token's and its top n alternatives
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N" (vLLM's extension)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"We could not parse the JSON body of your request ({exc}); send a JSON "
                      "object with Content-Type: application/json.") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def _validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        got = error.get("input")
        shown = "" if isinstance(got, dict) or error["type"] == "missing" else f" (got {got!r:.80})"
        raise invalid(f"Invalid value for '{_top_field(error['loc'])}': {error['msg']}{shown}.",
                      param=_top_field(error["loc"]),
                      code="missing_required_parameter" if error["type"] == "missing" else None) from None


def _top_field(loc: tuple[Any, ...]) -> str:
    return str(loc[0]) if loc else "body"


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise invalid(f"'stop' takes at most {MAX_STOPS} sequences (got {len(stops)}).", param="stop")
    if any(not s for s in stops):
        raise invalid("'stop' sequences must not be empty.", param="stop")
    return tuple(stops)


def completion_prompt(request: CompletionRequest, tokenizer: Any) -> list[int]:
    prompt = request.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if prompt and all(isinstance(t, int) for t in prompt):
        return _token_ids([int(t) for t in prompt], tokenizer, "prompt")  # type: ignore[arg-type]
    raise invalid("'prompt' must be one string or one list of token ids (this server runs one "
                  "prompt per request).", param="prompt")


def _token_ids(ids: list[int], tokenizer: Any, param: str) -> list[int]:
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 1 << 32
    if any(not 0 <= t < vocab for t in ids):
        raise invalid(f"'{param}' holds token ids outside the vocabulary [0, {vocab}).", param=param)
    return ids


def chat_prompt(request: ChatRequest, tokenizer: Any) -> list[int]:
    messages = [{"role": m.role, "content": _content_text(m.content)} for m in request.messages]
    template = None if getattr(tokenizer, "chat_template", None) else BUNDLED_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer.encode(text))


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid("Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.",
                          param="messages")
        parts.append(part["text"])
    return "".join(parts)


def build_generation(kind: Literal["completion", "chat"], body: dict[str, Any], defaults: Defaults,
                     tokenizer: Any) -> Generation:
    """Validate ``body`` (already a JSON object) against the server's model and limits."""
    request: CompletionRequest | ChatRequest
    if kind == "completion":
        completion: CompletionRequest = _validated(CompletionRequest, body)
        request, prompt_param = completion, "prompt"
        prompt_ids, max_tokens = completion_prompt(completion, tokenizer), completion.max_tokens
    else:
        chat: ChatRequest = _validated(ChatRequest, body)
        request, prompt_param = chat, "messages"
        prompt_ids = chat_prompt(chat, tokenizer)
        max_tokens = chat.max_completion_tokens or chat.max_tokens
    if request.model != defaults.model:
        raise unknown_model(request.model, defaults.model)
    max_tokens = max_tokens or defaults.max_tokens
    _check_lengths(len(prompt_ids), max_tokens, defaults, prompt_param)
    options = request.stream_options or {}
    return Generation(
        kind=kind, model=defaults.model, prompt_ids=prompt_ids, max_tokens=max_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        seed=request.seed, stop=_stops(request.stop),
        stop_token_ids=tuple(_token_ids(request.stop_token_ids or [], tokenizer, "stop_token_ids")),
        stream=request.stream,
        include_usage=bool(options.get("include_usage")), logprobs=_logprobs(request),
        tokens_as_ids=request.return_tokens_as_token_ids)


def _logprobs(request: CompletionRequest | ChatRequest) -> int | None:
    """Completions: ``logprobs: n``; chat: ``logprobs: true`` with ``top_logprobs: n`` (OpenAI's)."""
    if isinstance(request, CompletionRequest):
        return request.logprobs
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def _check_lengths(prompt_tokens: int, max_tokens: int, defaults: Defaults, prompt_param: str) -> None:
    if prompt_tokens == 0:
        raise invalid(f"'{prompt_param}' is empty: give at least one token of prompt.", param=prompt_param)
    if max_tokens > defaults.max_tokens_limit:
        raise invalid(f"'max_tokens' is {max_tokens}; this pool allows at most "
                      f"{defaults.max_tokens_limit} (limits.max_new_tokens).", param="max_tokens")
    if prompt_tokens > defaults.prompt_tokens_limit or prompt_tokens + max_tokens > defaults.context_tokens:
        raise APIError(400, f"This model's maximum context length is {defaults.context_tokens} tokens "
                       f"(prompts at most {defaults.prompt_tokens_limit}); you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {prompt_param}, "
                       f"{max_tokens} for the completion). Shorten the {prompt_param} or max_tokens.",
                       param=prompt_param, code="context_length_exceeded")
