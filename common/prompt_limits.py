"""Does a prompt fit the model? One rule for the edge (before it sends) and the verifier (at open)."""

from __future__ import annotations


def prompt_problem(prompt_tokens: int, max_new_tokens: int, context: int, model: str = "the model") -> str:
    """Why a session with this prompt cannot run, or "" when it can (``context`` 0: unknown)."""
    if prompt_tokens == 0:
        return "the prompt is empty (it encodes to no tokens): give some text"
    if context and prompt_tokens + max_new_tokens > context:
        room = context - prompt_tokens
        advice = (f"lower max_new_tokens to {room} or shorten the prompt" if room > 0
                  else "shorten the prompt")
        return (f"the prompt is {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} it needs "
                f"{prompt_tokens + max_new_tokens} positions, {model} has {context}: {advice}")
    return ""
