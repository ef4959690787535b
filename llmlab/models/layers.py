"""Primitives shared byte-for-byte by more than one model family.

RMSNorm, rotary position embeddings (with the common context-extension scalings), the
attention-mask builder, the one call into `scaled_dot_product_attention`, the SwiGLU MLP, the
output head with its loss and the preallocated KV cache. Anything that only one family uses lives
in that family's file; the faster twins of some of these live in `kernels.py`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.kernels import (Linear, Rotary, linear_cross_entropy, plain_linear, rotate, single_query_attention,
                                   stacked_linear)


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
        return Rotary.apply(x, cos, sin)
    return rotate(x, cos, sin)  # no autograd node to build: skip the Function's overhead


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
        return single_query_attention(q, k, v, mask, scale)
    is_causal = mask is None and q.size(-2) > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=k.size(1) != q.size(1))


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
    if plain_linear(lm_head) and lm_head.bias is None:
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


# --------------------------------------------------------------------------- accounting


def check_config_ranges(cfg, counts: tuple[str, ...]) -> None:
    """The range checks every family's config shares: `counts` are >= 1 where set (None = derived
    later), norm_eps and init_std > 0, dropout in [0, 1), num_labels >= 0 and never with tied
    embeddings. Raises ValueError naming the field."""
    for name in counts:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("norm_eps", "init_std"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.num_labels < 0:
        raise ValueError(f"num_labels must be >= 0 (0: the language-model head), got {cfg.num_labels}")
    if cfg.num_labels and cfg.tie_embeddings:
        raise ValueError("a score head (num_labels > 0) cannot share the token embedding: set tie_embeddings=false")


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
