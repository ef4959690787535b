"""Freeze parameters by name pattern or layer range, for fine-tuning only part of a model."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from torch import nn

from llmlab.common import LlmlabError

RANGE = re.compile(r"(?:^|(?<=\.))(\d+)-(\d+)(?=\.|$)")


def expand_pattern(pattern: str) -> list[str]:
    """`layers.0-3` -> [layers.0, layers.1, layers.2, layers.3]; other patterns are kept as they are."""
    m = RANGE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo > hi:
        raise LlmlabError(f"freeze pattern {pattern!r}: the range {lo}-{hi} is empty")
    return [p for i in range(lo, hi + 1) for p in expand_pattern(pattern[:m.start()] + str(i) + pattern[m.end():])]


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter a pattern names; returns the frozen names.

    A pattern is a module or parameter name or a glob over them (`embed_tokens`, `layers.*.attn.*`,
    `lm_head.weight`), or a layer range such as `layers.0-5` (layers 0 to 5 inclusive). It covers a
    parameter when it matches the parameter's name or one of the modules that contain it. A pattern
    that covers nothing is an error, so a typo never silently trains the whole model; so is a range
    with a number that covers nothing (`layers.0-99` on a model of 4 layers).
    """
    names = [n for n, _ in model.named_parameters()]
    depth = getattr(getattr(model, "config", None), "n_layers", None)
    # no range may reach past the largest index in a name: checked before `layers.0-999999999` is expanded
    largest = max((int(part) for n in names for part in n.split(".") if part.isdigit()), default=-1)
    size = (f"the model's {depth} layers (layers.0-{depth - 1})" if depth and depth > 1 else
            "the model's single layer (layers.0)" if depth == 1 else f"the model's largest index {largest}")
    frozen: set[str] = set()
    for pattern in patterns:
        for m in RANGE.finditer(pattern):
            if int(m.group(2)) > largest:
                raise LlmlabError(f"freeze pattern {pattern!r}: the range {m.group(0)} reaches past {size}")
        hits = {n for n in names for p in expand_pattern(pattern) if _covers(p, n)}
        if not hits:
            modules = sorted({n.split(".")[0] for n in names})
            raise LlmlabError(f"freeze pattern {pattern!r} matches no parameter; top-level modules: "
                              f"{', '.join(modules)}")
        # a range must hold in full: one that runs past the last layer means another model was meant
        missing = [p for p in expand_pattern(pattern) if not any(_covers(p, n) for n in names)]
        if missing:
            raise LlmlabError(f"freeze pattern {pattern!r}: {missing[0]} matches no parameter (the range must hold "
                              f"in full, within {size})")
        frozen |= hits
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return [n for n in names if n in frozen]


def _covers(pattern: str, name: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
