"""``specd serve``: an OpenAI-compatible HTTP endpoint on the edge (docs/serve.md).

Each request is one speculative session of the edge's draft backend against the verifier pool.
Pure parts: ``schemas`` (requests -> a ``Generation``), ``text`` (token rounds -> text deltas, stop
strings), ``responses`` (OpenAI objects and SSE chunks), ``errors``. Shell: ``runner`` (sessions,
admission, cancellation), ``app`` (routes), ``server`` (CLI, embedded default, uvicorn).
"""
