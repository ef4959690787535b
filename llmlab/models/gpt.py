"""GPT: the pre-norm decoder of GPT-2 and GPT-3, and the relatives that share its block.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; Brown et al. 2020
(GPT-3, arXiv:2005.14165). Learned absolute positions, LayerNorm, a 4x GELU MLP, biases
everywhere and tied input/output embeddings. Three options cover the other published models
built on this block:
- position="alibi": linear attention biases instead of position embeddings (Press et al. 2022),
  with embed_norm=True as in BLOOM (arXiv:2211.05100);
- position="relative": Transformer-XL relative positions (Dai et al. 2019) with RMSNorm, as in
  Gopher and Chinchilla (arXiv:2112.11446, 2203.15556): a per-layer projection of sinusoidal
  distance encodings plus two learned per-head biases u and v.
GPT-1 is post-norm and GPT-3 alternates dense and banded-sparse attention; both are built here
with dense pre-norm blocks of the published shapes (the parameter counts are unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmlab.models.kernels import Linear
from llmlab.models.layers import (AttentionShape, KVCache, ParamCount, RMSNorm, build_attention_mask,
                                  check_config_ranges, lm_output, positions_from_mask, sdpa, training_flops_per_token)


@dataclass
class GPTConfig:
    causal: ClassVar[bool] = True  # each position sees only those before it (a decoder)
    family: Literal["gpt"] = "gpt"
    vocab_size: int | None = 50257  # token ids; None only where a trainer sets it (pretrain: from the data)
    dim: int = 768  # residual stream width
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int | None = None  # MLP width; None = 4 * dim
    max_seq_len: int = 1024  # context length (size of the learned position table)
    position: Literal["learned", "alibi", "relative"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    embed_norm: bool = False  # a norm right after the token embedding (BLOOM)
    bias: bool = True  # biases in every linear layer and LayerNorm
    tie_embeddings: bool = True  # share embed_tokens with lm_head
    num_labels: int = 0  # > 0: a score head of this many outputs replaces the language-model head (1: a reward model)
    dropout: float = 0.0  # embeddings, attention probabilities and residual branches
    init_std: float = 0.02  # std of the normal initialisation of matrices

    def __post_init__(self):
        check_config_ranges(self, ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"))
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.dim
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.position == "relative" and self.dim % 2:  # sin and cos halves of the distance encodings
            raise ValueError(f"dim={self.dim} must be even for position='relative'")

    def num_params(self) -> ParamCount:
        d, h, b = self.dim, self.hidden_dim, int(self.bias)
        norm = d * (1 + (b if self.norm == "layernorm" else 0))
        attn = 4 * d * d + 4 * d * b
        if self.position == "relative":
            attn += d * d + 2 * d  # distance projection and the u, v biases
        mlp = 2 * d * h + (h + d) * b
        body = self.n_layers * (attn + mlp + 2 * norm) + norm * (2 if self.embed_norm else 1)
        embeddings = self.vocab_size * d + (0 if self.tie_embeddings else (self.num_labels or self.vocab_size) * d)
        if self.position == "learned":
            embeddings += self.max_seq_len * d
        return ParamCount(body + embeddings, body, body + embeddings)

    def attention_shape(self) -> AttentionShape:
        return AttentionShape(self.n_heads, self.n_heads, self.dim // self.n_heads, gated_mlp=False)

    def flops_per_token(self, seq_len: int) -> int:
        return training_flops_per_token(self.num_params().non_embedding + self.vocab_size * self.dim,
                                        self.n_layers, self.dim, seq_len)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: the geometric sequence 2^(-8 i / n) for the largest power of two
    n <= n_heads, then every other slope of the sequence for 2n (Press et al. 2022, Sec. 3)."""
    def geometric(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encodings [len, dim] of integer positions (Vaswani et al. 2017, Sec. 3.5)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions.float()[:, None] * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, bias: bool, dropout: float, relative: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q_proj = Linear(dim, dim, bias=bias)
        self.k_proj = Linear(dim, dim, bias=bias)
        self.v_proj = Linear(dim, dim, bias=bias)
        self.o_proj = Linear(dim, dim, bias=bias)
        if relative:
            self.pos_proj = Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
            self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        else:
            self.pos_proj = None

    def forward(self, x, mask, distances, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, S, hs)
        if self.pos_proj is not None:
            # Transformer-XL: score = (q + u).k + (q + v).W_R r(i - j); SDPA scales q.k by
            # 1/sqrt(hs) but adds the mask as is, so the position term is scaled here.
            n_dist = int(distances.max()) + 1
            r = self.pos_proj(sinusoids(torch.arange(n_dist, device=x.device), C).to(x.dtype))
            r = r.view(n_dist, self.n_heads, self.head_dim).transpose(0, 1)  # (nh, R, hs)
            by_distance = (q + self.pos_bias_v[:, None]) @ r.transpose(-1, -2)  # (B, nh, T, R)
            index = distances[:, None].expand(B, self.n_heads, -1, -1)  # (B, nh, T, S)
            mask = mask + by_distance.gather(-1, index) / math.sqrt(self.head_dim)
            q = q + self.pos_bias_u[:, None]
        y = sdpa(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool):
        super().__init__()
        self.up_proj = Linear(dim, hidden_dim, bias=bias)
        self.down_proj = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the tanh approximation is the GELU that GPT-2 and BLOOM were trained with
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.bias, cfg.dropout, cfg.position == "relative")
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x, mask, distances=None, kv_cache=None, layer=0):
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, distances, kv_cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only GPT-architecture language model; `forward` returns next-token logits."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position == "learned" else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.dim, cfg.num_labels or cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        slopes = alibi_slopes(cfg.n_heads) if cfg.position == "alibi" else torch.zeros(0)
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices and embeddings, zero biases, unit norm gains; residual output
        projections scaled by 1/sqrt(2 n_layers) (GPT-2, Sec. 2.3)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if "norm" in name and name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> ParamCount:
        return self.config.num_params()

    def flops_per_token(self, seq_len: int) -> int:
        return self.config.flops_per_token(seq_len)

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg, p = self.config, self.embed_tokens.weight
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.dim // cfg.n_heads, max_len or cfg.max_seq_len,
                       p.device, p.dtype)

    def forward(self, input_ids: torch.Tensor, *, kv_cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Next-token logits, or the mean next-token loss when `targets` are given.

        Args:
            input_ids: (B, T) token ids.
            kv_cache: keys and values of earlier tokens; the new T tokens are appended to it.
            attention_mask: (B, S) with S = cached + T; 1 for tokens, 0 for padding (left or right).
            targets: (B, T) next-token ids, -100 where no loss is wanted.
            segment_ids: (B, T) with several sequences packed in a row: the id of each token's sequence
                (training, no cache); positions restart and attention stays within each sequence.
            logits_to_keep: n > 0 computes the logits of the last n positions only (a prefill needs
                one); 0, every position. Not with targets.

        Returns:
            logits (B, T, vocab_size) (T = logits_to_keep when given), or with targets the mean
            cross-entropy (a scalar), computed without materialising the logits
        """
        cfg = self.config
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        S = start + T
        positions = positions_from_mask(attention_mask, 0, S, input_ids.device, segment_ids)  # (B|1, S)
        learned = cfg.position == "learned"
        if learned and not torch.compiler.is_compiling() and int(positions.max()) >= cfg.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds the {cfg.max_seq_len} learned positions")
        mask, distances = build_attention_mask(T, S, padding_mask=attention_mask, device=input_ids.device,
                                               force=not learned, segment_ids=segment_ids), None
        if not learned:
            distances = (positions[:, -T:, None] - positions[:, None, :]).clamp(min=0)  # (B|1, T, S)
            mask = torch.zeros(mask.shape, dtype=self.embed_tokens.weight.dtype,
                               device=input_ids.device).masked_fill(~mask, float("-inf"))
            if cfg.position == "alibi":
                mask = mask - self.alibi_slopes[:, None, None] * distances[:, None]  # (B|1, nh, T, S)

        x = self.embed_tokens(input_ids)  # (B, T, dim)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions[:, -T:])
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, distances, use_reentrant=False)
            else:
                x = layer(x, mask, distances, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        return lm_output(self.lm_head, self.norm, x, targets, logits_to_keep)
