"""specd: distributed speculative decoding (README.md).

As a library: ``specd.generate``, ``specd.stream`` and ``specd.Client`` (``specd.api``); models,
Redis and torch load at the first call, so ``import specd`` (and the CLI's start) stays fast.
"""

import sys
import types

from specd import api
from specd.api import Chunk, Client, Result, Stream, stream

__all__ = ["Chunk", "Client", "Result", "Stream", "generate", "stream"]


class _Package(types.ModuleType):
    """``specd.generate`` is the API's function although a submodule has that name (the code of
    the ``specd generate`` command): importing that submodule must not replace the function."""

    @property
    def generate(self) -> object:
        return api.generate

    @generate.setter
    def generate(self, _submodule: object) -> None:
        pass  # the import system's binding of the submodule; it stays in sys.modules


sys.modules[__name__].__class__ = _Package
