"""Measure the bundled tiny draft/target pair: thin wrapper around ``specd.pair.report``.

Run from the repository root: ``python benchmarks/pair_report.py [--help]``.
"""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(importlib.import_module("specd.pair.report").main())
