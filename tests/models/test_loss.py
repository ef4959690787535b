"""`linear_cross_entropy` against `F.cross_entropy` on materialised logits, and the models' loss path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmlab.models import build_model
from llmlab.models.kernels import linear_cross_entropy
from tests.models.zoo import TINY, V


def _inputs(N=50, d=16, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (N,), generator=g)
    return hidden, weight, targets


def _reference(hidden, weight, targets):
    loss = F.cross_entropy(hidden @ weight.T, targets)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("block_rows", [1, 7, 16, 50, 64])  # uneven last block, one block, bigger than N
def test_loss_and_both_gradients_match_materialised_logits(block_rows):
    hidden, weight, targets = _inputs()
    targets[::5] = -100
    loss = linear_cross_entropy(hidden, weight, targets, block_rows=block_rows)
    for got, want in zip((loss, *torch.autograd.grad(loss, (hidden, weight))), _reference(hidden, weight, targets)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_incoming_gradient_scales_both_gradients():
    hidden, weight, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, targets, block_rows=8)
    gh, gw = torch.autograd.grad(3.0 * loss, (hidden, weight))
    _, rh, rw = _reference(hidden, weight, targets)
    torch.testing.assert_close((gh, gw), (3 * rh, 3 * rw))


def test_extreme_logits_give_the_exact_loss_not_infinity():
    hidden, weight, targets = _inputs(N=4, d=2, vocab=3)
    with torch.no_grad():
        hidden.copy_(torch.tensor([[500.0, 0.0], [0.0, 1.0], [-300.0, 2.0], [1.0, 1.0]]))
        weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))
    targets = torch.tensor([1, 0, 0, 2])  # rows 0 and 2 sit hundreds of nats from their target
    loss = linear_cross_entropy(hidden.float(), weight.float(), targets)
    want = F.cross_entropy(hidden.float() @ weight.float().T, targets)
    assert torch.isfinite(loss) and loss.item() > 100
    torch.testing.assert_close(loss, want)


def test_no_grad_path_and_all_rows_ignored():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, block_rows=9),
                                   F.cross_entropy(hidden @ weight.T, targets))
    loss = linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_loss_equals_cross_entropy_of_its_logits(name):
    torch.manual_seed(0)
    model = build_model(TINY[name])
    x = torch.randint(0, V, (2, 12))
    y = torch.randint(0, V, (2, 12))
    y[0, :4] = -100
    loss = model(x, targets=y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_a_head_that_is_not_a_plain_linear_layer_takes_the_generic_path():
    torch.manual_seed(0)
    model = build_model(TINY["llama"])
    x, y = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    want = model(x, targets=y)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # what an adapter wrapper looks like from outside
    torch.testing.assert_close(model(x, targets=y), want)
