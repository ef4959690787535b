"""BERT and the encoders that share its block: RoBERTa and ALBERT.

Devlin et al. 2019, "BERT" (arXiv:1810.04805): post-norm blocks (the residual sum is normalised,
x = LN(x + f(x))), learned absolute positions, token-type (segment) embeddings, LayerNorm after the
embeddings, an erf GELU MLP four times as wide, biases everywhere, and bidirectional attention:
every token sees every other real token of its row. Heads on the last hidden states:
- head="mlm": the masked-LM head, dense + GELU + LayerNorm, then the output matrix tied to the
  token embedding plus a bias (Sec. 3.1, Task #1); with sentence_head, also the pooler and a
  two-way classifier of the segment pair, trained beside it: next-sentence prediction (BERT,
  Task #2) or sentence-order prediction (ALBERT, Sec. 3.1), as the pretraining checkpoints hold;
  with span_boundary_head, SpanBERT's span boundary objective (Joshi et al. 2020, Sec. 3.2): each
  masked token of a span is also predicted from the two tokens just outside the span and its
  place in it, y = LN(GELU(W2 LN(GELU(W1 [x_{s-1}; x_{e+1}; p_{i-s+1}])))), through the same
  output matrix;
- head="classify": the pooler (dense + tanh on the first token, [CLS]) and a linear classifier
  (Sec. 4.1); RoBERTa's classification head is the same two layers on <s>;
- head="tokens": a linear classifier on every token (NER, Sec. 5.3);
- head="span": start and end logits for extractive question answering (SQuAD, Sec. 4.2).

variant="roberta" (Liu et al. 2019, arXiv:1907.11692) is BERT with positions counted from
pad_id + 1 over the real tokens only (fairseq's convention, so the table holds max_seq_len +
pad_id + 1 rows) and a single token type. variant="albert" (Lan et al. 2020, arXiv:1909.11942)
factorises the embedding (tokens of width embed_dim < dim, projected up to dim, Sec. 3.1) and
shares one block's weights across all layers (share_layers, Sec. 3.1); its GELU is the tanh
approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmlab.models.kernels import Linear
from llmlab.models.layers import AttentionShape, ParamCount, check_config_ranges, training_flops_per_token

HEADS = ("mlm", "classify", "tokens", "span")


@dataclass
class BertConfig:
    causal: ClassVar[bool] = False  # every token attends to every real token of its row (an encoder)
    family: Literal["bert"] = "bert"
    variant: Literal["bert", "roberta", "albert"] = "bert"
    vocab_size: int | None = 30522
    dim: int = 768  # hidden width H
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int | None = None  # MLP width; None = 4 * dim
    embed_dim: int | None = None  # ALBERT's factorised embedding width E, projected to dim; None = dim, no projection
    share_layers: bool = False  # ALBERT: every layer runs the same block's weights
    max_seq_len: int = 512  # tokens per row (roberta's position table has pad_id + 1 more rows)
    type_vocab_size: int = 2  # token types (segments A and B); roberta: 1
    pad_id: int = 0  # roberta counts positions from pad_id + 1 over the tokens that are not pad_id
    activation: Literal["gelu", "gelu_tanh"] = "gelu"  # erf GELU (BERT, RoBERTa) or its tanh approximation (ALBERT)
    norm_eps: float = 1e-12
    head: Literal["mlm", "classify", "tokens", "span"] = "mlm"
    num_labels: int = 0  # classes of the classify / tokens head (1 with classify: a regression); span: 2
    sentence_head: bool = False  # head=mlm: the pooler and a 2-way segment-pair classifier (NSP / SOP)
    span_boundary_head: bool = False  # head=mlm: SpanBERT's span boundary objective
    max_span: int = 10  # span_boundary_head: the longest span (its position table's rows)
    tie_embeddings: bool = True  # the MLM output matrix is the token embedding (other heads have none)
    dropout: float = 0.1  # embeddings, attention probabilities, residual branches and the classifier's input
    init_std: float = 0.02

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.head == "mlm" and self.num_labels:
            raise ValueError(f"num_labels={self.num_labels} needs a classification head (head=classify, tokens or "
                             "span); head=mlm predicts tokens")
        if self.head == "span":
            self.num_labels = self.num_labels or 2
            if self.num_labels != 2:
                raise ValueError(f"head=span has 2 outputs (start, end), got num_labels={self.num_labels}")
        if self.head in ("classify", "tokens") and not self.num_labels:
            raise ValueError(f"head={self.head} needs num_labels >= 1 (the number of classes)")
        if self.sentence_head and self.variant == "roberta":
            raise ValueError("sentence_head: RoBERTa is pretrained without a sentence-pair task")
        if self.head != "mlm":
            if self.sentence_head or self.span_boundary_head:
                raise ValueError(f"sentence_head and span_boundary_head go with head=mlm (pretraining), not "
                                 f"head={self.head}")
            self.tie_embeddings = False  # no output matrix to tie
        check_config_ranges(self, ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "embed_dim",
                                   "max_seq_len", "type_vocab_size", "max_span"))
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.dim
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.vocab_size is not None and not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is not a token id of vocab_size={self.vocab_size}")

    @property
    def width(self) -> int:
        """Width of the token embedding (E)."""
        return self.embed_dim or self.dim

    @property
    def position_rows(self) -> int:
        return self.max_seq_len + (self.pad_id + 1 if self.variant == "roberta" else 0)

    def num_params(self) -> ParamCount:
        d, h, e, v = self.dim, self.hidden_dim, self.width, self.vocab_size
        block = (4 * d * d + 4 * d) + (2 * d * h + h + d) + 2 * 2 * d  # attention, MLP, two LayerNorms
        body = block * (1 if self.share_layers else self.n_layers)
        body += (e * d + d) if self.embed_dim else 0  # the ALBERT projection E -> H
        body += 2 * e  # the embedding LayerNorm
        if self.head == "mlm":
            body += d * e + e + 2 * e + v  # transform, its LayerNorm, output bias
            body += (d * d + d + 2 * d + 2) if self.sentence_head else 0
            body += (self.max_span * d + 3 * d * d + d + 2 * d + d * e + e + 2 * e) if self.span_boundary_head else 0
        elif self.head == "classify":
            body += d * d + d + d * self.num_labels + self.num_labels
        else:
            body += d * self.num_labels + self.num_labels
        embeddings = v * e + (self.position_rows + self.type_vocab_size) * e
        if self.head == "mlm" and not self.tie_embeddings:
            embeddings += v * e
        return ParamCount(body + embeddings, body, body + embeddings)

    def attention_shape(self) -> AttentionShape:
        return AttentionShape(self.n_heads, self.n_heads, self.dim // self.n_heads, gated_mlp=False)

    def flops_per_token(self, seq_len: int) -> int:
        # shared layers run n_layers times: count the block's matmuls per layer, not per stored weight
        d, h = self.dim, self.hidden_dim
        matmuls = self.n_layers * (4 * d * d + 2 * d * h) + (self.width * d if self.embed_dim else 0)
        if self.head == "mlm":
            matmuls += d * self.width + self.vocab_size * self.width
        return training_flops_per_token(matmuls, self.n_layers, d, seq_len)


def gelu(cfg: BertConfig):
    return (lambda x: F.gelu(x, approximate="tanh")) if cfg.activation == "gelu_tanh" else F.gelu


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.dropout
        self.q_proj = Linear(cfg.dim, cfg.dim)
        self.k_proj = Linear(cfg.dim, cfg.dim)
        self.v_proj = Linear(cfg.dim, cfg.dim)
        self.o_proj = Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim)
        self.act = gelu(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Post-norm: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Bert(nn.Module):
    """A bidirectional encoder with one head (`BertConfig.head`); see the module docstring."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        e = cfg.width
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        self.embed_positions = nn.Embedding(cfg.position_rows, e)
        self.embed_types = nn.Embedding(cfg.type_vocab_size, e)
        self.embed_norm = nn.LayerNorm(e, eps=cfg.norm_eps)
        self.embed_proj = Linear(e, cfg.dim) if cfg.embed_dim else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(1 if cfg.share_layers else cfg.n_layers))
        if cfg.head == "mlm":
            self.mlm_dense = Linear(cfg.dim, e)
            self.mlm_norm = nn.LayerNorm(e, eps=cfg.norm_eps)
            self.lm_head = Linear(e, cfg.vocab_size, bias=True)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            if cfg.sentence_head:
                self.pooler = Linear(cfg.dim, cfg.dim)
                self.sentence_classifier = Linear(cfg.dim, 2)
            if cfg.span_boundary_head:
                self.sbo_positions = nn.Embedding(cfg.max_span, cfg.dim)
                self.sbo_up = Linear(3 * cfg.dim, cfg.dim)
                self.sbo_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
                self.sbo_down = Linear(cfg.dim, e)
                self.sbo_out_norm = nn.LayerNorm(e, eps=cfg.norm_eps)
        elif cfg.head == "classify":
            self.pooler = Linear(cfg.dim, cfg.dim)
            self.classifier = Linear(cfg.dim, cfg.num_labels)
        else:
            self.classifier = Linear(cfg.dim, cfg.num_labels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices and embeddings, zero biases, unit LayerNorm gains (BERT's
        initialisation)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if "norm" in name and name.endswith("weight") else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, self.config.init_std)

    def num_params(self) -> ParamCount:
        return self.config.num_params()

    def flops_per_token(self, seq_len: int) -> int:
        return self.config.flops_per_token(seq_len)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B|1, T) positions: 0.. for BERT and ALBERT; for RoBERTa pad_id + 1.. over the tokens that
        are not pad_id, and pad_id on those."""
        cfg = self.config
        T = input_ids.size(1)
        if cfg.variant != "roberta":
            return torch.arange(T, device=input_ids.device)[None]
        real = (input_ids != cfg.pad_id).long()
        return real.cumsum(1) * real + cfg.pad_id

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's hidden states (B, T, dim)."""
        cfg = self.config
        T = input_ids.size(1)
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the {cfg.max_seq_len} learned positions")
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.embed_tokens(input_ids) + self.embed_positions(self.position_ids(input_ids)) + self.embed_types(types)
        x = self.dropout(self.embed_norm(x))  # (B, T, E)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # (B, T, dim)
        # bidirectional: a key is hidden only when it is padding; a padded query's row still sees the
        # real tokens, so no row is all -inf
        mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None  # (B, 1, 1, T)
        for i in range(cfg.n_layers):
            layer = self.layers[0 if cfg.share_layers else i]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def mlm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The masked-LM head's logits (..., vocab_size) of hidden states x (..., dim)."""
        return self.lm_head(self.mlm_norm(gelu(self.config)(self.mlm_dense(x))))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooler's output (B, dim): dense + tanh of the first token's hidden state ([CLS] / <s>)."""
        first = x[:, 0]
        return torch.tanh(self.pooler(self.dropout(first) if self.config.variant == "roberta" else first))

    def sentence_logits(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The segment-pair classifier's logits (B, 2) of a model with sentence_head."""
        if not self.config.sentence_head:
            raise ValueError("this model has no sentence head (sentence_head=false)")
        return self.sentence_classifier(self.pooled(self.encode(input_ids, attention_mask, token_type_ids)))

    def span_boundary_loss(self, x: torch.Tensor, targets: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                           position: torch.Tensor) -> torch.Tensor:
        """SpanBERT's span boundary loss: the mean cross-entropy of each masked span token predicted
        from the hidden states x (B, T, dim) at its span's boundaries and its place in the span."""
        keep = (position >= 0) & (targets != -100)
        if not bool(keep.any()):
            return x.new_zeros(())
        rows = torch.arange(x.size(0), device=x.device)[:, None].expand_as(position)[keep]
        T = x.size(1)
        h = torch.cat([x[rows, left[keep].clamp(0, T - 1)], x[rows, right[keep].clamp(0, T - 1)],
                       self.sbo_positions(position[keep].clamp(max=self.config.max_span - 1))], dim=-1)
        act = gelu(self.config)
        y = self.sbo_out_norm(act(self.sbo_down(self.sbo_norm(act(self.sbo_up(h))))))
        return F.cross_entropy(self.lm_head(y).float(), targets[keep])

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                sentence_targets: torch.Tensor | None = None,
                span_boundaries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The head's logits, or with `targets` its mean loss.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for tokens, 0 for padding (anywhere in the row).
            token_type_ids: (B, T) segment of each token (0: A, 1: B); default all 0.
            targets: mlm and tokens (B, T) ids or labels, -100 where no loss is wanted; classify (B,)
                labels (float values with num_labels=1: a regression, mean squared error); span (B, 2)
                start and end positions.
            sentence_targets: with sentence_head and targets, (B,) the segment pair's class (BERT: 1 = B
                is a random sentence; ALBERT: 1 = the segments are swapped); its loss is added.
            span_boundaries: with span_boundary_head and targets, (left, right, position), each (B, T):
                for a token of a masked span s..e the positions s - 1 and e + 1 and its place i - s in
                the span, -1 elsewhere (`llmlab.data.masking.span_mask`); the span boundary loss is
                added.

        Returns:
            mlm (B, T, vocab_size); classify (B, num_labels); tokens (B, T, num_labels); span
            (B, T, 2) start and end logits; or with targets the mean loss (a scalar)
        """
        cfg = self.config
        x = self.encode(input_ids, attention_mask, token_type_ids)
        if cfg.head == "mlm":
            if sentence_targets is not None and (targets is None or not cfg.sentence_head):
                raise ValueError("sentence_targets need targets and a model with sentence_head")
            if span_boundaries is not None and (targets is None or not cfg.span_boundary_head):
                raise ValueError("span_boundaries need targets and a model with span_boundary_head")
            extra = 0.0
            if sentence_targets is not None:
                extra = F.cross_entropy(self.sentence_classifier(self.pooled(x)).float(), sentence_targets)
            if span_boundaries is not None:
                extra = extra + self.span_boundary_loss(x, targets, *span_boundaries)
            if isinstance(extra, torch.Tensor):
                self.aux_loss = extra.detach()  # the sentence-pair and span boundary losses, logged apart
            if targets is not None:  # only the predicted positions go through the head
                keep = targets != -100
                x, targets = x[keep], targets[keep]
            logits = self.mlm_logits(x)
            return logits if targets is None else F.cross_entropy(logits.float(), targets) + extra
        pooled = self.pooled(x) if cfg.head == "classify" else x
        logits = self.classifier(self.dropout(pooled))
        return logits if targets is None else self.head_loss(logits, targets)

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a classify, tokens or span head's logits (as `forward` returns them) on
        `targets` (as `forward` takes them)."""
        head = self.config.head
        if head == "classify":
            if self.config.num_labels == 1:
                return F.mse_loss(logits.float().squeeze(-1), targets.float())
            return F.cross_entropy(logits.float(), targets)
        if head == "tokens":
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        if head != "span":
            raise ValueError(f"head_loss scores the classify, tokens and span heads, not head={head}")
        # span: positions outside the row are clamped to T, which no logit covers (ignored), as SQuAD
        # training treats an answer that the window cut off
        T = logits.size(1)
        starts, ends = (targets[:, i].clamp(0, T) for i in range(2))
        start_logits, end_logits = logits.float().unbind(-1)
        return (F.cross_entropy(start_logits, starts, ignore_index=T) +
                F.cross_entropy(end_logits, ends, ignore_index=T)) / 2

