"""The fast paths: what the models compute faster than the plain expression of it would, kept apart
from the primitives in `layers.py` so that those read as the textbook definitions.

Each kernel equals its plain counterpart up to float rounding, and the tests say so:
- `Rotary` / `rotate`: the rotary rotation and its gradient as fused multiply-adds into one output;
- `single_query_attention`: one query's attention as two products and a softmax, for compiled decoding;
- `Linear`: `nn.Linear` with a product split over the cores for the few rows of decoding on CPUs;
- `stacked_linear`: projections that read the same input as one product in compiled decoding;
- `linear_cross_entropy`: the output head and the loss a block of rows at a time, never the logits;
- `StaticKVCache`: the KV cache as compiled decoding writes it in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from llmlab.models.layers import KVCache


# --------------------------------------------------------------------------- rotary


class Rotary(torch.autograd.Function):
    """The rotation and its gradient, which is the rotation by the opposite angle; each is four
    fused multiply-adds into one output instead of autograd's chain of temporaries."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]; cos and sin broadcast to x (batch 1 or B,
    # one head axis), so the output has x's shape
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[..., :half], sin[..., :half]
    if torch.compiler.is_compiling():  # the compiler fuses the plain expression into one kernel
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


# --------------------------------------------------------------------------- attention


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float | None) -> torch.Tensor:
    """Attention of one query per head (decoding) as two small products and a softmax, for compiled
    steps: the compiler fuses these into a few kernels, where the fused SDPA kernel is an opaque call
    of about 100 us (eager decoding keeps that kernel, slightly faster than these operations one by
    one). The query heads sharing a key head become its rows, so keys are never repeated."""
    B, nh, _, hs = q.shape
    n_kv = k.size(1)
    q = q.reshape(B, n_kv, nh // n_kv, hs)  # (B, n_kv, group, hs)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else hs**-0.5)  # (B, n_kv, g, S)
    if mask is not None:
        if mask.size(1) > 1:  # a per-head bias (B|1, nh, 1, S)
            mask = mask.reshape(mask.size(0), n_kv, nh // n_kv, mask.size(-1))
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, nh, 1, v.size(-1))


# --------------------------------------------------------------------------- linear layers


# weights at least this large (elements), multiplied by at most this many rows, take the split path
GEMV_SPLIT_MIN = 1 << 16
GEMV_SPLIT_MAX_ROWS = 16


class Linear(nn.Linear):
    """`nn.Linear` with a faster product for a few input rows on CPU, the case of decoding.

    The BLAS kernels stream the weight through one core when the input has one row, and run far
    below their peak with a few rows. Cut into 4 row blocks and multiplied as one batched product,
    the same weight is read by every core: about 1.7x the memory bandwidth that decoding is bound by
    for a 32000 x 1024 head at one row on 2 cores, and 2x the speed at 4 rows. Used only without
    autograd, on CPU, for large weights; everything else is `F.linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (torch.is_grad_enabled() or x.device.type != "cpu" or w.numel() < GEMV_SPLIT_MIN or w.size(0) % 4
                or torch.compiler.is_compiling()):
            return F.linear(x, w, self.bias)  # training takes this exit first: nothing more to compute
        rows = x.numel() // x.size(-1) if x.size(-1) else 0
        if not 0 < rows <= GEMV_SPLIT_MAX_ROWS:
            return F.linear(x, w, self.bias)
        blocks = w.view(4, -1, w.size(1)).transpose(1, 2)  # (4, in, out / 4)
        out = torch.bmm(x.reshape(1, rows, -1).expand(4, rows, -1), blocks)  # (4, rows, out / 4)
        out = out.view(*x.shape[:-1], w.size(0)) if rows == 1 else out.transpose(0, 1).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def plain_linear(layer: nn.Module) -> bool:
    """Whether `layer` is exactly `nn.Linear` or this module's `Linear` (no other subclass, no adapter
    around one), so its product may be computed from its weight and bias directly."""
    return type(layer) in (nn.Linear, Linear)


def stacked_linear(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """`tuple(layer(x) for layer in layers)` for linear layers that read the same input.

    In a compiled graph without autograd the weights are stacked into one product: with frozen
    weights the stack is a constant, and a decode step streams one long matrix where it read several
    short ones (5% faster on the 186.9M model of benchmarks/decode_speed.py). Elsewhere, or when a
    layer is not a plain `Linear` (one wrapped by an adapter, say), one call each.
    """
    stack = (torch.compiler.is_compiling() and not torch.is_grad_enabled()
             and all(plain_linear(layer) for layer in layers)
             and len({layer.bias is None for layer in layers}) == 1)
    if not stack:
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


# --------------------------------------------------------------------------- loss


# logits held at once by the blockwise loss: rows per block = this // vocabulary size
LOSS_BLOCK_ELEMENTS_CPU = 2**22
LOSS_BLOCK_ELEMENTS_GPU = 2**26


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T`, computed a block of rows at a time.

    The (N, V) logits never exist at once: one block's logits, turned in place into its softmax
    and then into the gradient (softmax - onehot) / count, live in a buffer reused for every
    block, so the work stays in cache and no large tensor is allocated. Both input gradients are
    therefore computed in the forward pass; backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, block_rows: int):
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32 at least
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            valid = targets != ignore_index
            count = valid.sum().clamp(min=1)
            scale = valid.to(acc) / count  # each row's weight in the mean
            safe_targets = torch.where(valid, targets, 0)
            losses = torch.empty(hidden.size(0), device=device, dtype=acc)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
            buf = torch.empty(min(block_rows, hidden.size(0)), weight.size(0), device=device, dtype=acc)
            for start in range(0, hidden.size(0), block_rows):
                rows = slice(start, start + block_rows)
                h = hidden[rows].to(dtype)
                target = safe_targets[rows, None]
                probs = buf[: h.size(0)]
                if dtype == acc:
                    torch.mm(h, w.T, out=probs)
                else:
                    probs.copy_(h @ w.T)
                picked = probs.gather(1, target).squeeze(1)
                if not want_grad:  # evaluation: the exact log-sum-exp, nothing else
                    lse = torch.logsumexp(probs, dim=-1)
                    losses[rows] = lse - picked
                    continue
                torch.softmax(probs, dim=-1, out=probs)
                p_target = probs.gather(1, target).squeeze(1)
                losses[rows] = -p_target.log()
                # -log p underflows past ~87 nats; recompute those rare rows exactly
                tiny = p_target < 1e-30
                if tiny.any():
                    logits = h[tiny].to(acc) @ w.T.to(acc)
                    losses[rows][tiny] = torch.logsumexp(logits, -1) - picked[tiny]
                probs.scatter_add_(1, target, torch.full_like(p_target[:, None], -1.0))
                probs.mul_(scale[rows, None])  # (softmax - onehot) / count; 0 on ignored rows
                grad = probs.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad @ w
                if grad_weight is not None and dtype == acc:
                    grad_weight.addmm_(grad.T, h)
                elif grad_weight is not None:  # low-precision products, fp32 accumulation
                    grad_weight += (grad.T @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return (losses * scale).sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, block_rows: int | None = None) -> torch.Tensor:
    """Mean next-token loss `F.cross_entropy(hidden @ weight.T, targets)` without the logits tensor.

    hidden: (N, d); weight: (V, d), the output head; targets: (N,), with `ignore_index` rows left
    out of the mean. Equal to the two-step computation up to float rounding; much faster on CPUs
    and far lighter in memory for large vocabularies, since a (N, V) buffer is never allocated.
    """
    if block_rows is None:  # 16 MB of fp32 logits per block on CPUs, 256 MB on GPUs
        block_rows = max(16, (LOSS_BLOCK_ELEMENTS_GPU if hidden.is_cuda else LOSS_BLOCK_ELEMENTS_CPU)
                         // weight.size(0))
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, block_rows)


# --------------------------------------------------------------------------- KV cache for compiled decoding


class StaticKVCache:
    """Keys and values for compiled decoding of one token per row.

    Made from a prefilled `KVCache` (copied into one tensor per layer, so that a compiled step writes
    each in place as a whole input rather than through a view). A step sees it through `window(n)`:
    the first `n` slots, of which the last, `slot`, takes the new token's keys and values. `slot` is a
    one-element tensor the caller sets with `move_to`, so the position is data, not a shape; a step
    compiled with `n` as a dynamic size attends over the slots written so far, not the whole cache.
    """

    def __init__(self, cache: KVCache):
        self.k = [t.clone() for t in cache.k.unbind(0)]
        self.v = [t.clone() for t in cache.v.unbind(0)]
        self.max_len = cache.max_len
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.k.device)

    def move_to(self, slot: int) -> None:
        self.slot.fill_(slot)

    def window(self, n: int) -> _CacheWindow:
        return _CacheWindow(self, n)


class _CacheWindow:
    """The first `n` slots of a `StaticKVCache`, as the model's forward sees a cache: `length`
    tokens before the new one, which `update` writes at the cache's `slot` (the caller keeps
    `slot == n - 1`; the caller's padding mask, (B, n), hides any slot not written)."""

    def __init__(self, cache: StaticKVCache, n: int):
        self.cache, self.n, self.length = cache, n, n - 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        c.k[layer].index_copy_(2, c.slot, k)
        c.v[layer].index_copy_(2, c.slot, v)
        return c.k[layer][:, :, :self.n], c.v[layer][:, :, :self.n]

    def advance(self, n: int) -> None:
        """Nothing to do: the caller moves `slot`."""
