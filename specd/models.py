"""``specd models``: the models specd knows by name, whether each is installed, and the pairs.

A named model is usable as ``--target-model NAME`` / ``--draft-model NAME`` (or in settings);
``--pair NAME`` sets both models of a pair. Exit codes: 0 listed (installed or not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.settings import MODEL_PAIRS, Settings
from specd.failures import EPILOG
from specd.flags import HelpFormatter, add_setting_flags


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "models", formatter_class=HelpFormatter, epilog=EPILOG,
        help="list the named models and pairs (and whether each is installed)",
        description="List the models specd knows by name (usable as --target-model/--draft-model), "
        "whether each is installed and where, whether a GGUF one is already dequantised in the "
        "cache (edge.cache_dir), and the pairs --pair selects.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_flags(parser, "common")
    parser.add_argument("--draft-cache-dir", dest="cache_dir", default=None,
                        help="cache folder of dequantised GGUF files [edge.cache_dir]")
    parser.set_defaults(handler=run)
    return parser


def describe(cache_dir: str) -> dict[str, Any]:
    """Named models (installed?, where, cached?) and pairs, without loading or hashing anything."""
    from common.feature_draft import SHIPPED_FEATURE_DRAFTS
    from common.models import BUNDLED_DIR, GGUF_DONE, NAMED_MODELS, cache_root, named_model_file
    from common.reduced_draft import SHIPPED_DRAFTS

    cached = {json.loads(done.read_text()).get("source")
              for done in (cache_root(cache_dir) / "gguf").glob(f"*/{GGUF_DONE}")}
    models = []
    for name, entry in NAMED_MODELS.items():
        path = named_model_file(name)
        installed = path is not None and path.exists()
        models.append({"name": name, "description": entry.description, "installed": installed,
                       "path": str(path) if installed else None,
                       "dequantised": bool(installed and str(path) in cached),
                       "install": "" if installed else entry.install})
    for name, folder in SHIPPED_DRAFTS.items():  # drafts assembled from the target's own embedding
        models.append({"name": name, "description": "draft for smollm2-135m-instruct: 2 of its layers, "
                       "an 8,192-id head, its embedding taken from the target (docs/drafters.md)",
                       "installed": folder.is_dir(), "path": str(folder), "dequantised": False,
                       "install": ""})
    for name, folder in SHIPPED_FEATURE_DRAFTS.items():
        models.append({"name": name, "description": "feature draft for smollm2-135m-instruct: drafts from "
                       "the target's own hidden state, which each verdict carries (speculative sessions "
                       "only; docs/drafters.md)", "installed": folder.is_dir(), "path": str(folder),
                       "dequantised": False, "install": ""})
    for side in ("target", "draft"):
        models.append({"name": f"bundled:{side}", "description": f"bundled tiny {side} (Python code, "
                       "vocabulary 4,096; the tests' pair)", "installed": (BUNDLED_DIR / side).is_dir(),
                       "path": str(BUNDLED_DIR / side), "dequantised": False, "install": ""})
    pairs = [{"name": key, "target": target, "draft": draft} for key, (target, draft) in MODEL_PAIRS.items()]
    return {"models": models, "pairs": pairs}


def run(args: argparse.Namespace, settings: Settings) -> int:
    cache_dir = args.cache_dir if args.cache_dir is not None else settings.edge.cache_dir
    listing = describe(cache_dir)
    if args.json:
        print(json.dumps(listing))
        return 0
    for model in listing["models"]:
        state = "installed" if model["installed"] else "NOT installed"
        if model["dequantised"]:
            state += ", dequantised in the cache"
        print(f"{model['name']:24} {state}\n{'':24} {model['description']}")
        print(f"{'':24} {model['path'] or 'install: ' + model['install']}")
    default = (settings.models.target, settings.models.draft)
    print("\npairs (--pair NAME sets --target-model and --draft-model):")
    for pair in listing["pairs"]:
        mark = "  (the configured pair)" if (pair["target"], pair["draft"]) == default else ""
        print(f"  {pair['name']:8} target {pair['target']}, draft {pair['draft']}{mark}")
    print(f"\nAlso accepted: a .gguf file or a folder holding one (dequantised once into "
          f"{Path(cache_dir or '~/.cache/specd')}), a Hugging Face folder or hub id.")
    return 0
