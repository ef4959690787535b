"""Packed sequences: with segment ids, each sequence in a row computes exactly what it computes alone."""

from __future__ import annotations

import pytest
import torch

from llmlab.models import build_model
from llmlab.models.layers import positions_from_mask
from tests.models.zoo import TINY, V


def test_segment_positions_restart_per_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    pos = positions_from_mask(None, 0, 8, seg.device, seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


@pytest.mark.parametrize("name", sorted(TINY))
def test_packed_row_equals_each_sequence_alone(name):
    torch.manual_seed(0)
    model = build_model(TINY[name]).eval()
    g = torch.Generator().manual_seed(1)
    lengths = (5, 7, 3)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    row = torch.cat([*seqs, torch.zeros(2, dtype=torch.long)])[None]  # two pad tokens at the end
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(2, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(row, segment_ids=seg)[0]
        alone = torch.cat([model(s[None])[0] for s in seqs])
    assert torch.allclose(packed[:sum(lengths)], alone, atol=1e-5)
    assert torch.isfinite(packed).all()  # the pad tokens attend to themselves, never to nothing
