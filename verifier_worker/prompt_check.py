"""The verifier's open check that a session's prompt fits the target's context (a typed error)."""

from __future__ import annotations

from common.prompt_limits import prompt_problem
from common.wire import ErrorCode, SessionOpen, WireError


def check_prompt_fits(message: SessionOpen, context: int) -> None:
    """``WireError(LIMIT_EXCEEDED)`` to the session when prompt + max_new_tokens exceed ``context``."""
    problem = prompt_problem(int(message.prompt_ids.size), message.sampling.max_new_tokens, context,
                             "the target model")
    if problem:
        raise WireError(ErrorCode.LIMIT_EXCEEDED, problem, message.session_id)
