"""``specd eval``: run evaluation suites through the pipeline and score speed and quality.

suites (read the files) -> conversation (prompt ids per turn) -> modes (target-only, draft-only,
speculative) -> runner (waves of questions, records) -> quality, summary, plots.
"""
