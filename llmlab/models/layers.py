"""Primitives shared byte-for-byte by more than one model family.

RMSNorm, rotary position embeddings (with the common context-extension scalings), the
attention-mask builder, the one call into `scaled_dot_product_attention`, the SwiGLU MLP and
the preallocated KV cache. Anything that only one family uses lives in that family's file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019).

    The statistic is computed in fp32 whatever the input dtype, as the LLaMA reference does.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)  # one fused kernel each way
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------- rotary


@dataclass(frozen=True)
class RopeScaling:
    """Context-extension scaling of rotary frequencies, in the HF `rope_scaling` vocabulary.

    kind: "linear" (position interpolation, Chen et al. 2023), "dynamic" (dynamic NTK-aware),
    "yarn" (Peng et al. 2023) or "llama3" (the Llama 3.1 frequency-dependent rule).
    """

    kind: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None = 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range outwards

    KINDS = ("linear", "dynamic", "yarn", "llama3")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"rope scaling kind {self.kind!r} is not one of {', '.join(self.KINDS)}")
        if self.factor < 1.0:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.factor}")


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                  max_position_embeddings: int = 2048, seq_len: int | None = None
                  ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta^(-2i/d) for i < d/2 and the cos/sin amplitude ("attention factor").

    Args:
        head_dim: rotated dimension d (even).
        theta: the base, 10000 in RoFormer (Su et al. 2021), 500000 in Llama 3.
        scaling: optional context-extension rule.
        max_position_embeddings: the model's context; "dynamic" grows the base beyond it.
        seq_len: current sequence length, used only by "dynamic".

    Returns:
        (inv_freq [d/2] float32, attention_factor)
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / theta**exponents
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.kind == "linear":
        return inv_freq / factor, 1.0
    if scaling.kind == "dynamic":
        # NTK-aware: stretch the base so the lowest frequency covers seq_len; identity up to the context.
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base**exponents, 1.0
    original = scaling.original_max_position_embeddings or max_position_embeddings
    if scaling.kind == "llama3":
        low_wavelen = original / scaling.low_freq_factor
        high_wavelen = original / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, keep high ones, ramp linearly in between (YaRN eq. 3-4)
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings at arbitrary (possibly padded) positions.

    With "dynamic" scaling the frequencies depend on the longest position in the call; keys already
    in a KV cache keep the frequencies they were rotated with (as in HF transformers), so decoding
    past the context differs slightly from one full forward pass.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None,
                 max_position_embeddings: int = 2048):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_factor = rope_inv_freq(head_dim, theta, scaling, max_position_embeddings)
        # non-persistent: derived from the config, so it never enters a checkpoint
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B|1, T] -> (cos, sin) each [B|1, 1, T, head_dim]."""
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.kind == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq, _ = rope_inv_freq(self.head_dim, self.theta, self.scaling,
                                            self.max_position_embeddings, seq_len)
                inv_freq = inv_freq.to(positions.device)
        angles = positions[..., None].float() * inv_freq  # (B, T, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, d): halves layout, as HF stores q/k
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle. x: (B, nh, T, hs); cos, sin: (..., T, hs)
    with both halves equal, as `RotaryEmbedding` returns them."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)  # no autograd node to build: skip the Function's overhead


class _Rotary(torch.autograd.Function):
    """The rotation and its gradient, which is the rotation by the opposite angle; each is four
    fused multiply-adds into one output instead of autograd's chain of temporaries."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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


def positions_from_mask(attention_mask: torch.Tensor | None, start: int, length: int,
                        device: torch.device, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids [B|1, length] of all tokens seen so far (cache plus new).

    With a padding mask (1 = token, 0 = pad) positions count real tokens only, so a left-padded
    row gets the same positions as the unpadded sequence. With `segment_ids` (B, T), several
    sequences packed into one row, each segment's positions start again at 0.
    """
    if segment_ids is not None:
        index = torch.arange(segment_ids.size(1), device=device)
        new = torch.ones_like(segment_ids, dtype=torch.bool)
        new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        return index - torch.where(new, index, 0).cummax(-1).values  # distance from the segment's first token
    if attention_mask is None:
        return torch.arange(start, start + length, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(q_len: int, kv_len: int, *, padding_mask: torch.Tensor | None = None,
                         sliding_window: int | None = None, device: torch.device, force: bool = False,
                         segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, q_len, kv_len] (True = may attend) for the last q_len of kv_len tokens.

    `segment_ids` (B, T) packs several sequences into a row (no cache): a token attends only to
    earlier tokens of its own segment, so packed examples never see each other.

    Returns None when plain causal attention is enough and the caller can pass is_causal instead:
    no padding, no window, and either a full square (prefill) or a single query (decode); `force`
    asks for the mask anyway (for callers that add a position bias to it).
    Every query of a prefill may attend to itself, so a row of padding never becomes all -inf
    (which would make SDPA return NaN and poison later layers through the pad positions' keys). A
    single decode query is a real token, which the padding mask must mark; it gets no such rule,
    so it sees exactly what the mask allows.
    """
    plain = padding_mask is None and sliding_window is None and segment_ids is None
    if not force and plain and q_len in (kv_len, 1):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :kv_len].bool()
    if segment_ids is not None:
        if q_len != kv_len:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask | (k_pos == q_pos) if q_len > 1 else mask


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal multi-head attention through `F.scaled_dot_product_attention`.

    q: (B, nh, T, hs); k, v: (B, n_kv, S, hs) with nh a multiple of n_kv (grouped-query attention).
    mask: from `build_attention_mask` (bool) or a float bias to add; None means causal (T == S) or a single
    query that sees every key (T == 1).
    """
    if q.size(-2) == 1 and dropout_p == 0.0 and torch.compiler.is_compiling():
        return _single_query_attention(q, k, v, mask, scale)
    is_causal = mask is None and q.size(-2) > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=k.size(1) != q.size(1))


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
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


def _plain_linear(layer: nn.Module) -> bool:
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
             and all(_plain_linear(layer) for layer in layers)
             and len({layer.bias is None for layer in layers}) == 1)
    if not stack:
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


class SwiGLU(nn.Module):
    """Gated MLP down(silu(gate(x)) * up(x)) (Shazeer, 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=bias)
        self.up_proj = Linear(dim, hidden_dim, bias=bias)
        self.down_proj = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = stacked_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


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


def lm_output(lm_head: nn.Module, norm: nn.Module, hidden: torch.Tensor, targets: torch.Tensor | None,
              logits_to_keep: int = 0) -> torch.Tensor:
    """Logits (B, T, V) from the last layer's hidden states (B, T, dim) through the final `norm` and
    `lm_head`, of the last `logits_to_keep` positions only when it is positive; or with `targets` (B, T)
    the mean cross-entropy.

    A plain bias-free linear head takes the `linear_cross_entropy` path; any other head (one wrapped by
    an adapter, say) goes through its own forward and `F.cross_entropy`. Targets equal to -100 are ignored.
    """
    if logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
    if logits_to_keep and targets is not None:
        raise ValueError("logits_to_keep selects logits; it does not apply with targets")
    hidden = norm(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    if targets is None:
        return lm_head(hidden)
    if _plain_linear(lm_head) and lm_head.bias is None:
        return linear_cross_entropy(hidden.flatten(0, 1), lm_head.weight, targets.flatten())
    return F.cross_entropy(lm_head(hidden).float().flatten(0, 1), targets.flatten(), ignore_index=-100)


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim).

    A forward pass with T new tokens writes positions [length, length + T) in each layer through
    `update` and then calls `advance(T)`. The cache stores keys after the rotary rotation.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hs) after the cached tokens; return all keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_len={self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (1-D, may repeat or reorder): expands one prefilled prompt into n
        samples, reorders beams. Only the filled positions are copied."""
        n, rows = self.length, index.numel()
        if rows == self.k.size(1):  # same batch size: in place (the right side is gathered first)
            self.k[:, :, :, :n] = self.k[:, index, :, :n]
            self.v[:, :, :, :n] = self.v[:, index, :, :n]
            return
        shape = (self.k.size(0), rows, *self.k.shape[2:])
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :, :n], v[:, :, :, :n] = self.k[:, index, :, :n], self.v[:, index, :, :n]
        self.k, self.v = k, v

    def first_rows(self, n: int) -> KVCache:
        """The first n batch rows as a cache of their own, sharing this one's storage: what a forward
        pass writes through it lands here."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        return view

    def reset(self) -> None:
        self.length = 0


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


# --------------------------------------------------------------------------- accounting


def check_config_ranges(cfg, counts: tuple[str, ...]) -> None:
    """The range checks every family's config shares: `counts` are >= 1 where set (None = derived
    later), norm_eps and init_std > 0, dropout in [0, 1). Raises ValueError naming the field."""
    for name in counts:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("norm_eps", "init_std"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")


class ParamCount(NamedTuple):
    """Parameter counts. `non_embedding` excludes the vocabulary matrices (token embedding and an
    untied output head) and learned position embeddings, as in Kaplan et al. 2020. `active` counts
    what one token's forward pass uses: all of them in a dense model, the routed experts' share in
    a mixture of experts."""

    total: int
    non_embedding: int
    active: int


class AttentionShape(NamedTuple):
    """What the planner needs of a family's blocks, so that no code outside `models/` asks for a family
    by name: heads, key/value heads (fewer with grouped-query attention), the width of one head, and
    whether the MLP is gated (three matrices, SwiGLU) rather than two."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    gated_mlp: bool


def training_flops_per_token(matmul_params: int, n_layers: int, attn_dim: int, seq_len: int) -> int:
    """Forward plus backward FLOPs per token: 6 N + 12 L d_attn T.

    N is the non-embedding parameter count plus the output head (the head is a matmul, the input
    embedding a lookup); the second term is the QK^T and AV products at context length T
    (Kaplan et al. 2020, Table 1; Hoffmann et al. 2022, App. F), counted without causal savings.
    """
    return 6 * matmul_params + 12 * n_layers * attn_dim * seq_len
