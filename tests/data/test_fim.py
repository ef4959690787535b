"""Fill-in-the-middle reordering: structure, invertibility, rate and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.data.fim import FimSpec, fim_permute

PRE, MID, SUF, EOS = 1000, 1001, 1002, 1

DOCS = [np.arange(10, 30), np.arange(40, 47), np.arange(50, 51), np.arange(60, 100)]


def _row(docs=DOCS, trailing_eos=20) -> np.ndarray:
    """Documents each closed by EOS, then empty pieces (lone EOS) that leave room for the sentinels."""
    parts = [np.append(d, EOS) for d in docs] + [np.full(trailing_eos, EOS)]
    return np.concatenate(parts).astype(np.int64)


def _restore(piece: np.ndarray) -> np.ndarray:
    """Undo PSM or SPM: either way the original is (PRE..SUF) + (after MID) + (SUF..MID)."""
    assert piece[0] == PRE
    s, m = int(np.flatnonzero(piece == SUF)[0]), int(np.flatnonzero(piece == MID)[0])
    return np.concatenate([piece[1:s], piece[m + 1:], piece[s + 1:m]])


@pytest.mark.parametrize("spm_rate, order", [(0.0, "psm"), (1.0, "spm")])
def test_every_document_is_reordered_and_can_be_restored(spm_rate, order):
    row = _row()
    out = fim_permute(row, FimSpec(PRE, MID, SUF, EOS, rate=1.0, spm_rate=spm_rate), np.random.default_rng(0))
    assert out.shape == row.shape and out.dtype == row.dtype
    pieces = np.split(out, np.flatnonzero(out == EOS) + 1)
    bodies = [p[:-1] for p in pieces if len(p) > 1]
    assert len(bodies) == len(DOCS)
    for body, doc in zip(bodies, DOCS):
        assert (body[1] == SUF) == (order == "spm")  # SPM opens with <PRE><SUF>
        np.testing.assert_array_equal(_restore(body), doc)


def test_rate_zero_is_the_identity_and_the_rate_is_respected():
    row = _row()
    spec = FimSpec(PRE, MID, SUF, EOS, rate=0.0)
    np.testing.assert_array_equal(fim_permute(row, spec, np.random.default_rng(0)), row)
    docs = [np.arange(i * 10 + 2, i * 10 + 9) for i in range(400)]
    out = fim_permute(_row(docs, trailing_eos=1300), FimSpec(PRE, MID, SUF, EOS, rate=0.3), np.random.default_rng(1))
    reordered = int((out == PRE).sum())
    assert 90 <= reordered <= 150  # 400 x 0.3 = 120, more than 3 sigma either side


def test_the_window_is_cut_back_to_its_length_and_draws_are_seeded():
    row = np.arange(10, 50, dtype=np.int32)  # one piece, no EOS: a window inside a long document
    spec = FimSpec(PRE, MID, SUF, EOS, rate=1.0)
    a = fim_permute(row, spec, np.random.default_rng(5))
    assert len(a) == len(row) and a.dtype == np.int32 and a[0] == PRE
    np.testing.assert_array_equal(a, fim_permute(row, spec, np.random.default_rng(5)))
    assert any(not np.array_equal(a, fim_permute(row, spec, np.random.default_rng(s))) for s in range(6, 10))
