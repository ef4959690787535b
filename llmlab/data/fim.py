"""Fill-in-the-middle training examples (Bavarian et al. 2022, "Efficient Training of Language
Models to Fill in the Middle").

A document is cut at two uniformly random points into prefix, middle and suffix and reordered,
so that ordinary next-token training teaches the model to write a middle given both sides:

    PSM:  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|eos|>
    SPM:  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle <|eos|>

SPM is the paper's variant (its Appendix D) in which prefix and middle stay contiguous. The cut
is applied at the context level on token ids: a training window is split at EOS tokens, each
piece is transformed with probability `rate`, and the result is cut back to the window's length
(each transformed piece grows by three sentinel tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FimSpec:
    prefix_id: int
    middle_id: int
    suffix_id: int
    eos_id: int
    rate: float = 0.5  # probability that a document is reordered
    spm_rate: float = 0.5  # of those, the fraction in SPM rather than PSM order


def fim_permute(row: np.ndarray, spec: FimSpec, rng: np.random.Generator) -> np.ndarray:
    """The window `row` (1-D token ids) with each EOS-delimited piece reordered with probability
    `spec.rate`; same length and dtype. Draws from `rng` in a fixed order, so a seeded generator
    gives the same result every time."""
    ends = np.flatnonzero(row == spec.eos_id) + 1  # each piece keeps its EOS
    pieces = np.split(row, ends)
    out = []
    for piece in pieces:
        has_eos = len(piece) > 0 and piece[-1] == spec.eos_id
        body = piece[:-1] if has_eos else piece
        if len(body) == 0 or rng.random() >= spec.rate:
            out.append(piece)
            continue
        i, j = np.sort(rng.integers(0, len(body) + 1, size=2))
        prefix, middle, suffix = body[:i], body[i:j], body[j:]
        pre, mid, suf = ([t] for t in (spec.prefix_id, spec.middle_id, spec.suffix_id))
        if rng.random() < spec.spm_rate:
            parts = [pre, suf, suffix, mid, prefix, middle]
        else:
            parts = [pre, prefix, suf, suffix, mid, middle]
        out.append(np.concatenate([np.asarray(p, dtype=row.dtype) for p in parts]
                                  + ([piece[-1:]] if has_eos else [])))
    return np.concatenate(out)[: len(row)]
