"""specd: distributed speculative decoding (README.md).

As a library: ``specd.generate``, ``specd.stream`` and ``specd.Client`` (``specd.api``); models,
Redis and torch load at the first call, so ``import specd`` (and the CLI's start) stays fast. The
``specd generate`` command's code is ``specd.generation``.
"""

from specd.api import Chunk, Client, Result, Stream, generate, stream

__all__ = ["Chunk", "Client", "Result", "Stream", "generate", "stream"]
