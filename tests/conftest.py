"""Shared test set-up: GPU tests skip without CUDA; HF interop tests skip without transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_hf = pytest.mark.skip(reason="needs the dev extras (transformers, peft)")
    has_hf = importlib.util.find_spec("transformers") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "hf" in item.keywords and not has_hf:
            item.add_marker(no_hf)
