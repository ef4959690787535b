"""T5: the text-to-text encoder-decoder, and mT5.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (arXiv:1910.10683). An encoder of bidirectional blocks and a decoder of causal blocks
that also attend to the encoder's output (cross-attention), both pre-norm with a scale-only
RMSNorm (no mean, no bias), no biases anywhere, and no position embeddings: each attention score
gets a learned scalar per head for the bucketed distance between query and key (Sec. 2.1),
computed once per stack and shared by its layers; the encoder's buckets tell left from right, the
decoder's see only the past. Scores are not scaled by 1/sqrt(head_dim) (the initialisation
absorbs it). The input and output embeddings are one matrix, and the decoder's output is scaled
by dim**-0.5 before it.

mlp="gated-gelu" is T5 v1.1 and mT5 (Xue et al. 2021, arXiv:2010.11934): the feed-forward is
GEGLU, down(gelu(gate(x)) * up(x)) (Shazeer 2020), and the output head is a separate matrix
without the scaling (tie_embeddings=False). mT5 is T5 v1.1 with a 250k-token multilingual
vocabulary.

`moe` makes it a Switch Transformer (Fedus et al. 2021): a mixture of experts (`llmlab.models.moe`)
in place of the feed-forward of every block, or of every other one in each stack (layers 1, 3, ...,
as the released Switch models); the router losses join the loss while training; padding (the
encoder's, and the targets' -100 or a `decoder_mask`'s zeros) is not routed.

Decoding runs the encoder once (`encode`) and then the decoder a token at a time (`decode`)
with a `Seq2SeqCache`: keys and values of the decoder's own tokens grow by one each step, those
of the encoder's output are projected once per layer and kept.
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
from llmlab.models.layers import AttentionShape, KVCache, ParamCount, RMSNorm, check_config_ranges
from llmlab.models.moe import MoEConfig, SparseMoE, add_router_losses


@dataclass
class T5Config:
    causal: ClassVar[bool] = False  # the encoder is bidirectional; the decoder is causal
    encoder_decoder: ClassVar[bool] = True  # inputs go through the encoder, targets through the decoder
    family: Literal["t5"] = "t5"
    vocab_size: int | None = 32128
    dim: int = 512  # d_model
    n_layers: int = 6  # encoder blocks
    n_decoder_layers: int | None = None  # None = n_layers
    n_heads: int = 8
    head_dim: int = 64  # d_kv: heads x head_dim need not equal dim
    hidden_dim: int = 2048  # d_ff
    mlp: Literal["relu", "gated-gelu"] = "relu"  # T5 v1.0, or v1.1 / mT5 (GEGLU)
    moe: MoEConfig | None = None  # a mixture of experts in place of the feed-forward (Switch)
    relative_buckets: int = 32  # distance buckets of the position bias
    relative_max_distance: int = 128  # distances from here on share the last bucket
    max_seq_len: int = 512  # input tokens (the bias has no table limit: this is what data and planner use)
    max_target_len: int = 512  # target tokens the decoder is asked to produce
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # the output head is the token embedding (v1.0)
    scale_logits: bool | None = None  # scale the decoder output by dim**-0.5; None = tie_embeddings (as T5 does)
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0  # the first decoder input (T5: the pad token)
    num_labels: int = 0  # no score heads for T5 (kept for the shared checks)
    dropout: float = 0.1
    init_std: float = 1.0  # T5's initializer_factor: matrices are normal(0, factor / sqrt(fan_in))

    def __post_init__(self):
        if self.num_labels:
            raise ValueError("T5 has no score head: num_labels must be 0")
        check_config_ranges(self, ("vocab_size", "dim", "n_layers", "n_decoder_layers", "n_heads", "head_dim",
                                   "hidden_dim", "relative_buckets", "relative_max_distance", "max_seq_len",
                                   "max_target_len"))
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.scale_logits is None:
            self.scale_logits = self.tie_embeddings
        if self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 4:
            raise ValueError(f"relative_buckets={self.relative_buckets} and relative_max_distance="
                             f"{self.relative_max_distance}: need at least 4 buckets and a max distance beyond the "
                             "exact buckets (relative_buckets / 4)")
        if self.vocab_size is not None:
            for name in ("pad_id", "eos_id", "decoder_start_id"):
                if not 0 <= getattr(self, name) < self.vocab_size:
                    raise ValueError(f"{name}={getattr(self, name)} is not a token id of vocab_size={self.vocab_size}")

    def _mlp_params(self, n_layers: int) -> tuple[int, int]:
        """(parameters, of which idle for a token) of the feed-forward layers of a stack of `n_layers`."""
        dense = (3 if self.mlp == "gated-gelu" else 2) * self.dim * self.hidden_dim
        if self.moe is None:
            return n_layers * dense, 0
        return self.moe.stack_params(n_layers, dense, self.dim, self.hidden_dim)

    def num_params(self) -> ParamCount:
        """Counts; with `moe`, `active` leaves out the experts a token does not use."""
        d, inner = self.dim, self.n_heads * self.head_dim
        attn = 4 * d * inner
        mlps = [self._mlp_params(self.n_layers), self._mlp_params(self.n_decoder_layers)]
        encoder = self.n_layers * (attn + 2 * d) + d
        decoder = self.n_decoder_layers * (2 * attn + 3 * d) + d
        bias = 2 * self.relative_buckets * self.n_heads
        body = encoder + decoder + bias + sum(n for n, _ in mlps)
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return ParamCount(body + embeddings, body, body + embeddings - sum(idle for _, idle in mlps))

    def attention_shape(self) -> AttentionShape:
        return AttentionShape(self.n_heads, self.n_heads, self.head_dim, gated_mlp=self.mlp == "gated-gelu")

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token of an input and target pair of `seq_len` tokens each, counted per
        token of either: 6 x (the matmul weights one token passes through) plus attention, 12 L d T for
        the encoder's and the decoder's self-attention and the decoder's cross-attention; halved
        because the encoder's and the decoder's tokens each use only their own stack."""
        d, inner = self.dim, self.n_heads * self.head_dim

        def mlp(n_layers: int) -> int:  # the feed-forward weights a token passes through in a stack
            total, idle = self._mlp_params(n_layers)
            return total - idle

        encoder = self.n_layers * 4 * d * inner + mlp(self.n_layers)
        decoder = self.n_decoder_layers * 8 * d * inner + mlp(self.n_decoder_layers) + self.vocab_size * d
        attention = 12 * inner * seq_len * (self.n_layers + 2 * self.n_decoder_layers)
        return (6 * (encoder + decoder) + attention) // 2


# --------------------------------------------------------------------------- position bias


def relative_position_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """The bucket of each key-minus-query distance (Raffel et al. 2020, Sec. 2.1; Mesh TensorFlow's rule).

    Bidirectional (the encoder): half the buckets for keys after the query, half for those before.
    Causal (the decoder): only keys at or before the query, all buckets for them. Within a
    direction, distances below half its buckets get one bucket each; larger ones share buckets
    whose width grows logarithmically up to max_distance, beyond which all share the last.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # the float expression and its truncation are those of the reference implementation, so that the
    # boundaries between log buckets fall where trained checkpoints expect them
    large = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
    """The per-head scalar added to attention scores for each bucketed distance: (1, nh, T, S)."""

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.embedding = nn.Embedding(cfg.relative_buckets, cfg.n_heads)

    def forward(self, q_len: int, k_len: int, start: int = 0) -> torch.Tensor:
        device = self.embedding.weight.device
        queries = torch.arange(start, start + q_len, device=device)[:, None]
        keys = torch.arange(k_len, device=device)[None, :]
        bucket = relative_position_bucket(keys - queries, bidirectional=self.bidirectional,
                                          num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.embedding(bucket).permute(2, 0, 1)[None]  # (1, nh, T, S)


def additive_mask(bias: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The position bias with the finfo-min of its dtype where `keep` is False: a row with nothing to
    see then averages the values instead of turning into NaN."""
    if keep is None:
        return bias
    return bias.masked_fill(~keep, torch.finfo(bias.dtype).min)


# --------------------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        inner = cfg.n_heads * cfg.head_dim
        self.q_proj = Linear(cfg.dim, inner, bias=False)
        self.k_proj = Linear(cfg.dim, inner, bias=False)
        self.v_proj = Linear(cfg.dim, inner, bias=False)
        self.o_proj = Linear(inner, cfg.dim, bias=False)

    def heads(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (B, nh, S, hs) of x (B, S, dim): a cross-attention's, of the encoder output."""
        return self.heads(self.k_proj, x), self.heads(self.v_proj, x)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Self-attention over x (appending to `cache`), or cross-attention over the given keys and
        values `kv`; `bias` (B|1, nh, T, S) holds the position bias and the mask."""
        B, T, _ = x.shape
        q = self.heads(self.q_proj, x)
        if kv is None:
            k, v = self.keys_values(x)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        else:
            k, v = kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """relu: down(relu(up(x))); gated-gelu: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False) if cfg.mlp == "gated-gelu" else None
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            h = F.relu(self.up_proj(x))
        else:
            h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        return self.down_proj(self.dropout(h))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)) [+ cross_attn(norm(x), encoder)] + mlp(norm(x))."""

    def __init__(self, cfg: T5Config, cross: bool, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.cross_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cross else None
        self.cross_attn = Attention(cfg) if cross else None
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe is not None and cfg.moe.is_moe(layer):
            self.mlp = SparseMoE(cfg.dim, cfg.moe.hidden_dim or cfg.hidden_dim, cfg.moe)
        else:
            self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x, bias, cross_bias=None, encoder_kv=None, cache=None, layer=0, tokens=None):
        """`tokens` (B, T), false at padding: what an MoE layer leaves unrouted."""
        x = x + self.dropout(self.attn(self.attn_norm(x), bias, cache=cache, layer=layer))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross_bias, kv=encoder_kv))
        h = self.mlp_norm(x)
        return x + self.dropout(self.mlp(h, tokens) if isinstance(self.mlp, SparseMoE) else self.mlp(h))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention)."""

    def __init__(self, cfg: T5Config, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.relative_bias = RelativeBias(cfg, bidirectional=not decoder)
        n = cfg.n_decoder_layers if decoder else cfg.n_layers
        self.layers = nn.ModuleList(Block(cfg, cross=decoder, layer=i) for i in range(n))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.gradient_checkpointing = False


@dataclass
class Seq2SeqCache:
    """What decoding keeps between steps: the decoder's own keys and values (growing), the encoder's
    projected once per layer, and the encoder's padding mask."""

    self_attn: KVCache
    cross: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: (k, v) of the encoder output, (B, nh, S, hs)
    encoder_mask: torch.Tensor | None  # (B, S) 1 for input tokens, 0 for padding

    @property
    def length(self) -> int:
        return self.self_attn.length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (1-D, may repeat or reorder): n samples of one prompt, or beam
        search's surviving hypotheses."""
        self.self_attn.select_rows(rows)
        self.cross = [(k[rows], v[rows]) for k, v in self.cross]
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask[rows]


class T5(nn.Module):
    """Encoder-decoder language model; `forward` returns the decoder's next-token logits."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = value

    def reset_parameters(self) -> None:
        """T5's initialisation (Mesh TensorFlow): each matrix normal(0, factor / sqrt(fan_in)), with
        the query's fan-in times head_dim (the unscaled scores); embeddings normal(0, factor); norm
        gains 1."""
        f, cfg = self.config.init_std, self.config
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name == "embed_tokens.weight" or name == "lm_head.weight":
                nn.init.normal_(p, 0.0, f)
            elif name.endswith("relative_bias.embedding.weight"):
                nn.init.normal_(p, 0.0, f * cfg.dim ** -0.5)
            elif name.endswith("q_proj.weight"):
                nn.init.normal_(p, 0.0, f * (cfg.dim * cfg.head_dim) ** -0.5)
            else:
                nn.init.normal_(p, 0.0, f * p.size(-1) ** -0.5)  # fan-in (of each expert, too)

    def num_params(self) -> ParamCount:
        return self.config.num_params()

    def flops_per_token(self, seq_len: int) -> int:
        return self.config.flops_per_token(seq_len)

    # ------------------------------------------------------------------ the two stacks

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's output (B, S, dim) for input_ids (B, S); attention_mask (B, S) 1 for tokens."""
        S = input_ids.size(1)
        if S > self.config.max_seq_len:
            raise ValueError(f"an input of {S} tokens exceeds max_seq_len={self.config.max_seq_len}")
        enc = self.encoder
        keep = attention_mask[:, None, None, :].bool() if attention_mask is not None else None  # (B, 1, 1, S)
        bias = additive_mask(enc.relative_bias(S, S), keep)
        x = enc.dropout(self.embed_tokens(input_ids))
        tokens = attention_mask.bool() if attention_mask is not None and self.config.moe else None
        for layer in enc.layers:
            if enc.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, bias, None, None, None, 0, tokens, use_reentrant=False)
            else:
                x = layer(x, bias, tokens=tokens)
        return enc.dropout(enc.norm(x))

    def make_cache(self, encoder_out: torch.Tensor, encoder_mask: torch.Tensor | None,
                   max_len: int | None = None) -> Seq2SeqCache:
        """A decoding cache for `encoder_out` (B, S, dim): the cross-attention keys and values of every
        decoder layer, projected once, and room for max_len decoder tokens."""
        cfg = self.config
        B = encoder_out.size(0)
        cross = [layer.cross_attn.keys_values(encoder_out) for layer in self.decoder.layers]
        kv = KVCache(cfg.n_decoder_layers, B, cfg.n_heads, cfg.head_dim, max_len or cfg.max_target_len,
                     encoder_out.device, encoder_out.dtype)
        return Seq2SeqCache(kv, cross, encoder_mask)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor | None = None,
               encoder_mask: torch.Tensor | None = None, *, cache: Seq2SeqCache | None = None,
               decoder_mask: torch.Tensor | None = None, routed: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last hidden states (B, T, dim), before the output head.

        Either the whole target at once with `encoder_out` (training, scoring), or, with `cache`,
        the next T tokens after those cached (generation; the cache holds the encoder's side).
        `decoder_mask` (B, start + T), 1 for the decoder's tokens, hides padding among the cached
        ones: rows of different lengths left-aligned in one cache (continuous batching). The position
        bias depends only on key minus query, so padding before a row's tokens shifts nothing.
        With experts, `routed` (B, T) (default: the last T of `decoder_mask`) is false at the
        positions an MoE layer leaves unrouted: target padding.
        """
        dec = self.decoder
        T = decoder_input_ids.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_target_len:
            raise ValueError(f"a target of {start + T} tokens exceeds max_target_len={self.config.max_target_len}")
        if cache is not None:
            encoder_mask = cache.encoder_mask
        causal = torch.arange(start + T, device=decoder_input_ids.device)[None, :] <= \
            torch.arange(start, start + T, device=decoder_input_ids.device)[:, None]
        keep = causal[None, None]  # (1, 1, T, start + T)
        if decoder_mask is not None:
            keep = keep & decoder_mask[:, None, None, :].bool()  # (B, 1, T, start + T)
        bias = additive_mask(dec.relative_bias(T, start + T, start), keep)  # (B|1, nh, T, start + T)
        S = cache.cross[0][0].size(2) if cache is not None else encoder_out.size(1)
        cross_bias = torch.zeros(1, 1, T, S, device=decoder_input_ids.device)
        if encoder_mask is not None:
            cross_bias = additive_mask(cross_bias, encoder_mask[:, None, None, :].bool())
        x = dec.dropout(self.embed_tokens(decoder_input_ids))
        if routed is None and decoder_mask is not None:
            routed = decoder_mask[:, -T:]
        tokens = routed.bool() if routed is not None and self.config.moe else None
        for i, layer in enumerate(dec.layers):
            if cache is not None:
                x = layer(x, bias, cross_bias, cache.cross[i], cache.self_attn, i, tokens)
                continue
            kv = layer.cross_attn.keys_values(encoder_out)
            if dec.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, bias, cross_bias, kv, None, 0, tokens, use_reentrant=False)
            else:
                x = layer(x, bias, cross_bias, kv, tokens=tokens)
        if cache is not None:
            cache.self_attn.advance(T)
        return dec.dropout(dec.norm(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.scale_logits:
            hidden = hidden * self.config.dim ** -0.5
        return self.lm_head(hidden)

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for `targets` (B, T): the start token, then the targets but the last, with
        -100 (no loss) read as padding."""
        start = torch.full_like(targets[:, :1], self.config.decoder_start_id)
        previous = targets[:, :-1].masked_fill(targets[:, :-1] == -100, self.config.pad_id)
        return torch.cat([start, previous], dim=1)

    def forward(self, input_ids: torch.Tensor, *, decoder_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                encoder_out: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of the decoder, or with `targets` the mean cross-entropy.

        Args:
            input_ids: (B, S) the encoder's input tokens.
            decoder_input_ids: (B, T) the decoder's input tokens; default: `targets` shifted right
                behind the start token (teacher forcing).
            attention_mask: (B, S) 1 for input tokens, 0 for padding.
            targets: (B, T) target ids, -100 where no loss is wanted (padding).
            encoder_out: (B, S, dim) the encoder's output when already computed.

        Returns:
            logits (B, T, vocab_size), or with targets the mean cross-entropy (a scalar)
        """
        if decoder_input_ids is None:
            if targets is None:
                raise ValueError("T5 needs decoder_input_ids or targets (the decoder's side)")
            decoder_input_ids = self.shift_right(targets)
        if encoder_out is None:
            encoder_out = self.encode(input_ids, attention_mask)
        routed = targets != -100 if targets is not None else None  # target padding: not routed
        logits = self.logits(self.decode(decoder_input_ids, encoder_out, attention_mask, routed=routed))
        out = logits if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                             ignore_index=-100)
        if self.config.moe is None:
            return out
        moe = [b.mlp for stack in (self.encoder, self.decoder) for b in stack.layers if isinstance(b.mlp, SparseMoE)]
        return add_router_losses(self, moe, out, targets is not None)
