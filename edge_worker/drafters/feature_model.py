"""feature: drafts from the target's own hidden state (common.feature_draft), on the CPU.

The torch drafter hands a feature-draft model (``models.draft`` naming a
folder holding ``specd_feature_draft.json``) to this one, so either backend name works.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from edge_worker.drafters.registry import DraftContext, Drafter, register

if TYPE_CHECKING:
    from edge_worker.backends.base import DraftBackend


def build(ctx: DraftContext) -> DraftBackend:
    """Reads edge.cache_dir (the GGUF digest cache) and models.trust_remote_code."""
    from common.feature_draft import FEATURE_META, feature_draft_folder, load_feature_draft, target_embedding
    from common.models import (
        ModelLoadError,
        file_sha256,
        load_tokenizer,
        resolve_model_path,
        vocab_fingerprint,
    )
    from edge_worker.backends.feature_backend import FeatureDraftBackend
    from edge_worker.drafters.placement import place, ready

    folder = feature_draft_folder(ctx.model)
    if folder is None:
        raise ModelLoadError(f"{ctx.model!r} is not a feature draft (no {FEATURE_META}); the feature "
                             "backend drafts with a folder made by "
                             "`specd train-draft --feature`")
    cache = ctx.settings.edge.cache_dir
    try:
        meta = json.loads((folder / FEATURE_META).read_text())
        embedding = target_embedding(folder, meta, lambda path: file_sha256(path, cache),
                                     lambda name: resolve_model_path(name, cache))
        draft = load_feature_draft(folder, embedding)
    except (OSError, ValueError, KeyError, ImportError) as exc:  # ImportError: no `gguf` package
        raise ModelLoadError(f"cannot load the feature draft {ctx.model!r}: {exc}") from exc
    tokenizer = load_tokenizer(str(folder), ctx.settings.models.trust_remote_code)
    eos = frozenset(int(t) for t in meta.get("eos_token_ids", ())) | (
        {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    backend = FeatureDraftBackend(draft, tokenizer, vocab_fingerprint(tokenizer), ctx.model, eos)
    return ready("feature", backend, ctx, place(ctx, "feature"))


def candidates(kind: str, index: str) -> list[str]:
    return ["cpu"] if kind in ("cpu", "auto") else []


register(Drafter("feature", "drafts from the target's own hidden state, which each verdict carries "
                 "(models.draft: a folder made by specd train-draft --feature)", build, package="torch",
                 devices=lambda: ["cpu"], candidates=candidates))
