"""llmlab: a hackable, native-PyTorch lab for the whole life of a language model.

The package root stays light: `import llmlab` pulls in nothing heavy until a function is called.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, device="cpu", **kwargs):
    """Load an llmlab checkpoint or a local HF-format folder (auto-detected) as an nn.Module.

    `model(input_ids)` with input_ids LongTensor[B, T] returns logits [B, T, V]. See
    `llmlab.models.io.load_model` for the keyword arguments (dtype, allow_pickle).
    """
    from llmlab.models.io import load_model as _load_model

    return _load_model(path, device, **kwargs)


def load_tokenizer(path):
    """Load a tokenizer.json file, or a folder holding one (see `llmlab.tokenizer.load_tokenizer`)."""
    from llmlab.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)
