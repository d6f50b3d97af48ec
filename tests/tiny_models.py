"""Tiny Hugging Face causal LMs built inside the tests (random weights, a real tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nprint(os.getcwd())\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
] * 20


def build_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus or CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|eos|>",
                                   pad_token="<|pad|>")


OTHER_CORPUS = ["SELECT name FROM users WHERE id = 1;\n", "<html><body>hi</body></html>\n"] * 30
"""Text unlike ``CORPUS``: a tokenizer trained on it assigns other ids to other merges."""


def random_model(tokenizer: Any, seed: int, hidden: int = 64, layers: int = 2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # confident, context-dependent predictions, like a trained model
        model.lm_head.weight.mul_(12.0)
    return model.eval()


def perturbed_copy(model: Any, seed: int, noise: float) -> Any:
    """A draft that agrees with ``model`` often but not always: the same weights plus noise."""
    import copy

    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(noise * parameter.std() * torch.randn_like(parameter))
    return draft


def save(model: Any, tokenizer: Any, folder: Path) -> Path:
    """``save_pretrained`` both: the layout of a hub download."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_model_with_tokenizer(tokenizer_folder: str | Path, out: Path, seed: int = 1,
                                hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama over another model's tokenizer (e.g. SmolLM2's 49,152 tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return save(random_model(tokenizer, seed, hidden, layers), tokenizer, out)


def feature_draft_for(target_folder: str | Path, out: Path, seed: int = 5, layers: int = 1) -> Path:
    """A feature draft (common.feature_draft) over a saved target: random layers, the target's
    embedding (read by name from the target's folder at load), a head over every id. Its drafts
    are mostly wrong, which is what exactness tests want: rounds that accept and reject."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from common.feature_draft import FeatureDraft, FeatureDraftConfig, save_feature_draft

    config = AutoConfig.from_pretrained(target_folder)
    with safe_open(str(Path(target_folder) / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight").float()
        norm = f.get_tensor("model.norm.weight").float()
    torch.manual_seed(seed)
    shape = FeatureDraftConfig(hidden_size=config.hidden_size, intermediate_size=2 * config.hidden_size,
                               layers=layers, vocab_size=embedding.shape[0])
    draft = FeatureDraft(shape, embedding, norm, torch.arange(embedding.shape[0]))
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    save_feature_draft(draft, out, {"embedding_model": str(target_folder),
                                    "eos_token_ids": [int(t) for t in eos if t is not None]})
    AutoTokenizer.from_pretrained(target_folder).save_pretrained(out)
    return out
