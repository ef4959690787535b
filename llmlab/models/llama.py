"""LLaMA: a pre-norm decoder with RMSNorm, SwiGLU, rotary positions and grouped-query attention.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (arXiv:2302.13971);
"Llama 2" (arXiv:2307.09288) adds grouped-query attention (Ainslie et al. 2023) to the 70B model.
The same file covers checkpoints that share the architecture:
- Mistral: grouped-query attention plus a sliding attention window;
- Qwen2: biases on the q, k and v projections;
- PaLM-style shapes: multi-query attention (n_kv_heads=1), a wide head_dim, tied embeddings and
  the "parallel" block x + attn(norm(x)) + mlp(norm(x)) (Chowdhery et al. 2022);
- Mixtral-style sparse models: `moe` puts a mixture-of-experts layer (`llmlab.models.moe`) in place
  of the MLP of every block, or of every other one (GLaM); the router's auxiliary losses join the
  loss while training (never an evaluation's) and are left in `aux_loss`; padding (0 in
  `attention_mask`) is not routed.
Rotary embeddings use the half-split layout of HF checkpoints, so their weights load unpermuted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmlab.models.kernels import Linear, stacked_linear
from llmlab.models.layers import (AttentionShape, KVCache, ParamCount, RMSNorm, RopeScaling, RotaryEmbedding, SwiGLU,
                                  apply_rotary, build_attention_mask, check_config_ranges, lm_output,
                                  positions_from_mask, sdpa, training_flops_per_token)
from llmlab.models.moe import MoEConfig, SparseMoE, add_router_losses


@dataclass
class LlamaConfig:
    causal: ClassVar[bool] = True  # each position sees only those before it (a decoder)
    family: Literal["llama"] = "llama"
    vocab_size: int | None = 32000  # token ids; None only where a trainer sets it (pretrain: from the data)
    dim: int = 4096  # residual stream width
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads: None = n_heads (MHA), 1 = multi-query
    head_dim: int | None = None  # None = dim // n_heads
    hidden_dim: int | None = None  # SwiGLU width; None = 8/3 dim rounded up to a multiple of 256
    max_seq_len: int = 2048  # context length the model was trained for
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: RopeScaling | None = None  # context extension: linear, dynamic, yarn, llama3
    tie_embeddings: bool = False  # share embed_tokens with lm_head
    num_labels: int = 0  # > 0: a score head of this many outputs replaces the language-model head (1: a reward model)
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2)
    sliding_window: int | None = None  # attend to at most this many past tokens (Mistral)
    parallel_block: bool = False  # attention and MLP read the same normed input (PaLM)
    moe: MoEConfig | None = None  # a mixture of experts in place of the MLP (of every block, or every other)
    dropout: float = 0.0  # on attention probabilities and residual branches while training
    init_std: float = 0.02  # std of the normal initialisation of matrices

    def __post_init__(self):
        check_config_ranges(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                                   "max_seq_len", "sliding_window"))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = 256 * -(-int(8 * self.dim / 3) // 256)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 1:  # the frequencies theta^(-2i/d) need a base above 1 to spread out
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.head_dim)

    def num_params(self) -> ParamCount:
        """Counts; with `moe`, `active` leaves out the experts a token does not use (E - k per MoE block)."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.attention_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        norms = d if self.parallel_block else 2 * d
        dense = 3 * d * self.hidden_dim
        mlps, idle = (self.n_layers * dense, 0) if self.moe is None else \
            self.moe.stack_params(self.n_layers, dense, d, self.hidden_dim)
        body = d + self.n_layers * (attn + norms) + mlps
        vocab = self.vocab_size * d + (0 if self.tie_embeddings else (self.num_labels or self.vocab_size) * d)
        return ParamCount(body + vocab, body, body + vocab - idle)

    def attention_shape(self) -> AttentionShape:
        return AttentionShape(self.n_heads, self.n_kv_heads, self.head_dim, gated_mlp=True)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, from the parameters a token uses (the active ones of an MoE)."""
        n = self.num_params()
        return training_flops_per_token(n.non_embedding - (n.total - n.active) + self.vocab_size * self.dim,
                                        self.n_layers, self.n_heads * self.head_dim, seq_len)


def _check_rope_scaling(s: RopeScaling, head_dim: int) -> None:
    """Refuse the settings for which `rope_inv_freq` would divide by zero or take the log of a
    non-positive number (the kind and factor >= 1 are RopeScaling's own checks)."""
    if s.original_max_position_embeddings is not None and s.original_max_position_embeddings < 1:
        raise ValueError(f"rope_scaling.original_max_position_embeddings must be >= 1, got "
                         f"{s.original_max_position_embeddings}")
    if s.kind == "dynamic" and head_dim < 4:
        raise ValueError(f"rope_scaling kind 'dynamic' needs head_dim >= 4, got {head_dim}")
    if s.kind == "llama3" and not 0 < s.low_freq_factor < s.high_freq_factor:
        raise ValueError(f"rope_scaling needs 0 < low_freq_factor < high_freq_factor, got {s.low_freq_factor} "
                         f"and {s.high_freq_factor}")
    if s.kind == "yarn":
        for name in ("beta_fast", "beta_slow", "attention_factor"):
            if getattr(s, name) is not None and not getattr(s, name) > 0:
                raise ValueError(f"rope_scaling.{name} must be > 0, got {getattr(s, name)}")


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool, dropout: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = n_heads, n_kv_heads, head_dim, dropout
        self.q_proj = Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = stacked_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, S, hs)
        y = sdpa(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.attention_bias,
                              cfg.dropout)
        self.mlp_norm = None if cfg.parallel_block else RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe is not None and cfg.moe.is_moe(layer):
            self.mlp = SparseMoE(cfg.dim, cfg.moe.hidden_dim or cfg.hidden_dim, cfg.moe)
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0, tokens=None):
        """`tokens` (B, T), false at padding: what an MoE layer leaves unrouted."""
        h = self.attn_norm(x)
        attn_out = self.dropout(self.attn(h, cos, sin, mask, kv_cache, layer))
        mlp = functools.partial(self.mlp, tokens=tokens) if isinstance(self.mlp, SparseMoE) else self.mlp
        if self.parallel:
            return x + attn_out + self.dropout(mlp(h))
        x = x + attn_out
        return x + self.dropout(mlp(self.mlp_norm(x)))


class Llama(nn.Module):
    """Decoder-only LLaMA-architecture language model; `forward` returns next-token logits."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.num_labels or cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, zero biases, unit norms; output projections of each residual
        branch scaled by 1/sqrt(2 n_layers) (GPT-2) so the residual stream's variance stays flat."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
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
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len or cfg.max_seq_len,
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
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        positions = positions_from_mask(attention_mask, start, T, input_ids.device, segment_ids)[:, -T:]
        cos, sin = self.rotary(positions, self.embed_tokens.weight.dtype)
        mask = build_attention_mask(T, start + T, padding_mask=attention_mask,
                                    sliding_window=self.config.sliding_window, device=input_ids.device,
                                    segment_ids=segment_ids)
        x = self.embed_tokens(input_ids)  # (B, T, dim)
        tokens = attention_mask[:, -T:].bool() if attention_mask is not None and self.config.moe else None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, None, 0, tokens, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i, tokens)
        if kv_cache is not None:
            kv_cache.advance(T)
        out = lm_output(self.lm_head, self.norm, x, targets, logits_to_keep)
        if self.config.moe is None:
            return out
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]
        return add_router_losses(self, moe, out, targets is not None)
