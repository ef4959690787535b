"""Mixture of experts: a feed-forward layer of E expert MLPs of which each token uses k.

A router (one linear map, no bias) scores the experts of every token; the k best take the token
and their outputs are summed, weighted by the router. After the papers:
- Shazeer et al. 2017, "Outrageously Large Neural Networks": the sparsely gated layer;
- Fedus et al. 2021, "Switch Transformers": k = 1, plain ReLU experts (`gated=False`), the chosen
  expert's softmax probability as its weight (`normalize="all"`), a capacity of
  ceil(capacity_factor * k * tokens / E) tokens per expert beyond which tokens are dropped (they
  pass through the residual only), multiplicative jitter on the router's input while training,
  and the load-balancing loss E * sum_i f_i P_i;
- Zoph et al. 2022, "ST-MoE": the router z-loss, the mean squared log-sum-exp of the router logits;
- Du et al. 2021, "GLaM": k = 2, the two weights renormalised to sum to 1 (`normalize="topk"`), an
  MoE layer in every other block;
- Jiang et al. 2024, "Mixtral of Experts": k = 2 of 8 SwiGLU experts, renormalised, dropless
  (`capacity_factor=None`).

Routing and the losses are pure functions (`route`, `assign`, `load_balancing_loss`,
`router_z_loss`); `SparseMoE` is the layer: a `router` and the `experts`, whose weights are stacked
per projection in an `ExpertLinear` each, `gate_up_proj` (E, 2 * hidden, dim) (or `up_proj`
(E, hidden, dim) for plain experts) and `down_proj` (E, dim, hidden), HF Mixtral's layout and
names; LoRA and NF4 wrap these by name as they wrap linear layers. Dispatch sorts the (token,
expert) assignments by expert and runs each expert once on its contiguous slice of tokens; the
outputs are scattered back with their weights. When capacity drops assignments, earlier ranks come
first (every token's first choice before any second choice), then earlier tokens (GShard's
priority).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.models.kernels import Linear


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class MoEConfig:
    n_experts: int = 8  # E: expert MLPs per MoE layer
    top_k: int = 2  # k: experts each token goes to (Switch 1; GLaM and Mixtral 2)
    every: int = 1  # an MoE layer in every `every`-th block, the others dense (GLaM: 2); see is_moe
    hidden_dim: int | None = None  # each expert's MLP width; None: the dense MLP's
    gated: bool = True  # experts act(x W_gate) * (x W_up) (Mixtral: silu); false: act(x W_up) (GLaM)
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"  # the experts' nonlinearity
    normalize: Literal["topk", "all"] = "topk"  # weights: softmax renormalised over the k chosen, or over all E
    capacity_factor: float | None = None  # None: dropless; else tokens per expert = ceil(cf * k * T / E)
    aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch's alpha)
    z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE uses 0.001)
    jitter: float = 0.0  # router input times uniform(1 - jitter, 1 + jitter) while training (Switch: 0.01)

    def __post_init__(self):
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.normalize not in ("topk", "all"):
            raise ValueError(f"normalize must be topk or all, got {self.normalize!r}")
        if self.top_k == 1 and self.normalize == "topk":  # p / p = 1: no gradient reaches the router's choice
            raise ValueError("top_k=1 with normalize=topk weighs every token's expert by 1, so the router would "
                             "learn from the auxiliary loss alone; use normalize=all (Switch)")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or null: dropless), got {self.capacity_factor}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def is_moe(self, layer: int) -> bool:
        """Whether block `layer` (from 0) has the MoE layer: the last of each run of `every` blocks."""
        return layer % self.every == self.every - 1

    def stack_params(self, n_layers: int, dense: int, dim: int, dense_hidden_dim: int) -> tuple[int, int]:
        """(parameters, of which idle for any one token) of the feed-forward layers of `n_layers` blocks,
        `dense` parameters each where `is_moe` puts no MoE layer; counted, not looped over."""
        n_moe = n_layers // self.every  # the blocks every-1, 2 every-1, ... below n_layers
        moe, idle = self.layer_params(dim, dense_hidden_dim)
        return (n_layers - n_moe) * dense + n_moe * moe, n_moe * idle

    def layer_params(self, dim: int, dense_hidden_dim: int) -> tuple[int, int]:
        """(parameters, of which idle for any one token) of one MoE layer: the router and every expert,
        of which E - k sit idle; experts are `dense_hidden_dim` wide unless `hidden_dim` says otherwise."""
        expert = (3 if self.gated else 2) * dim * (self.hidden_dim or dense_hidden_dim)
        return dim * self.n_experts + self.n_experts * expert, (self.n_experts - self.top_k) * expert

    def unlike_mixtral(self) -> list[str]:
        """What keeps these experts from being Mixtral's (in every block, dropless, gated SiLU, the top k
        renormalised): the reasons, or none."""
        why = []
        if self.every != 1:
            why.append(f"moe.every={self.every} (experts in every block or in none)")
        if self.capacity_factor is not None:
            why.append(f"moe.capacity_factor={self.capacity_factor} (Mixtral's experts drop no tokens)")
        if not self.gated or self.activation != "silu":
            why.append("experts that are not gated silu MLPs (Mixtral's are SwiGLU)")
        if self.normalize != "topk":
            why.append(f"moe.normalize={self.normalize!r} (Mixtral renormalises the top-k weights)")
        return why


class Routing(NamedTuple):
    weights: torch.Tensor  # (N, k) each chosen expert's weight
    experts: torch.Tensor  # (N, k) the chosen experts, best first
    probs: torch.Tensor  # (N, E) the router's softmax (float32)


def route(logits: torch.Tensor, k: int, normalize: str = "topk") -> Routing:
    """The k best experts of each token from router logits (N, E), and their weights: the softmax
    probabilities renormalised over the k (`topk`) or as they are (`all`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    if normalize == "topk":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, experts, probs)


def capacity(n_tokens: int, n_experts: int, k: int, factor: float | None) -> int | None:
    """Tokens one expert takes: ceil(factor * k * n_tokens / n_experts); None when dropless."""
    return None if factor is None else max(1, math.ceil(factor * k * n_tokens / n_experts))


def assign(experts: torch.Tensor, n_experts: int, limit: int | None) -> torch.Tensor:
    """(N, k) bool: which assignments an expert keeps when it takes at most `limit` of them, by rank
    first (every first choice before any second) and then by token position; all when limit is None."""
    if limit is None:
        return torch.ones_like(experts, dtype=torch.bool)
    N, k = experts.shape
    by_rank = experts.t().reshape(-1)  # (k * N): rank 0 of every token, then rank 1, ...
    one_hot = F.one_hot(by_rank, n_experts)  # (k * N, E)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # each assignment's place in its expert's queue
    return (position < limit).view(k, N).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E * sum_i f_i P_i summed over the k ranks (as HF computes
    it for Mixtral): f_i the share of tokens whose choice of that rank is expert i, P_i the mean router
    probability of expert i. 1 per rank when routing is uniform; larger when it is not."""
    f = F.one_hot(experts, n_experts).float().mean(dim=0)  # (k, E)
    return n_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean over tokens of logsumexp(router logits)^2, which keeps them small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class ExpertLinear(nn.Module):
    """E bias-free linear maps stacked in one `weight` (E, out_features, in_features); `forward(x, e)`
    applies expert e's."""

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        nn.init.normal_(self.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.linear(x, self.weight[e])

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}"


def plain_layer(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """A plain layer holding a copy of `weight` (and `bias`), on its device and in its dtype: an
    `ExpertLinear` for an (E, out, in) stack of experts, else a `Linear` (out, in); what merged
    adapters and dequantized 4-bit layers become."""
    if weight.dim() == 3:
        layer = ExpertLinear(weight.size(0), weight.size(2), weight.size(1))
    else:
        layer = Linear(weight.size(1), weight.size(0), bias=bias is not None)
    layer.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class Experts(nn.Module):
    """E MLPs, gated (`gate_up_proj`: the gate and up projections stacked, as HF Mixtral) or plain
    (`up_proj`); `forward(x, e)` runs expert e on tokens x (n, dim)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, gated: bool = True, activation: str = "silu"):
        super().__init__()
        self.gated, self.act = gated, ACTIVATIONS[activation]
        if gated:
            self.gate_up_proj = ExpertLinear(n_experts, dim, 2 * hidden_dim)
        else:
            self.up_proj = ExpertLinear(n_experts, dim, hidden_dim)
        self.down_proj = ExpertLinear(n_experts, hidden_dim, dim)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x, e).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up, e)
        return self.down_proj(self.act(self.up_proj(x, e)), e)


class SparseMoE(nn.Module):
    """The MoE feed-forward: x (B, T, dim) -> (B, T, dim). After each forward, `aux_loss` holds the
    weighted load-balancing and z losses (a tensor in the graph while training) and `stats` the
    detached expert loads (tokens per expert) and the number of dropped assignments."""

    def __init__(self, dim: int, hidden_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg, self.hidden_dim = cfg, hidden_dim
        E = cfg.n_experts
        self.router = nn.Linear(dim, E, bias=False)
        self.experts = Experts(E, dim, hidden_dim, cfg.gated, cfg.activation)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict | None = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) router logits of the tokens x (N, dim), with Switch's jitter while training."""
        if self.training and self.cfg.jitter:
            x = x * torch.empty_like(x).uniform_(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter)
        return self.router(x)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) -> (B, T, dim). `tokens` (B, T), true for tokens and false for padding, leaves
        padding out of the routing, the losses and the loads (its output is zero)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        if tokens is None:
            return self._dispatch(x).view(shape)
        rows = tokens.reshape(-1).nonzero().squeeze(1)
        return torch.zeros_like(x).index_copy(0, rows, self._dispatch(x[rows])).view(shape)

    def _dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on tokens x (N, dim); sets `aux_loss` and `stats`."""
        cfg, E = self.cfg, self.cfg.n_experts
        N = x.size(0)
        if N == 0:  # a batch of padding alone
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
            self.stats = {"tokens_per_expert": torch.zeros(E, dtype=torch.long, device=x.device), "dropped": 0}
            return x
        logits = self.router_logits(x)  # (N, E)
        r = route(logits, cfg.top_k, cfg.normalize)
        keep = assign(r.experts, E, capacity(N, E, cfg.top_k, cfg.capacity_factor))  # (N, k)
        token = torch.arange(N, device=x.device)[:, None].expand_as(r.experts)[keep]  # (M,)
        expert, weight = r.experts[keep], r.weights[keep]
        order = torch.argsort(expert, stable=True)  # assignments grouped by expert
        token, expert, weight = token[order], expert[order], weight[order]
        counts = torch.bincount(expert, minlength=E)
        out = torch.zeros_like(x)
        ys = []
        for e, (start, end) in enumerate(_slices(counts.tolist())):
            if end > start:  # expert e on its contiguous slice of tokens
                ys.append(self.experts(x[token[start:end]], e))
        if ys:
            out.index_add_(0, token, torch.cat(ys) * weight[:, None].to(x.dtype))
        aux = cfg.aux_loss_coef * load_balancing_loss(r.probs, r.experts, E) if cfg.aux_loss_coef else 0.0
        if cfg.z_loss_coef:
            aux = aux + cfg.z_loss_coef * router_z_loss(logits)
        self.aux_loss = aux if isinstance(aux, torch.Tensor) else logits.new_zeros(())
        self.stats = {"tokens_per_expert": counts.detach(), "dropped": int(N * cfg.top_k - token.numel())}
        return out


def add_router_losses(model: nn.Module, layers: list[SparseMoE], out: torch.Tensor, has_targets: bool
                      ) -> torch.Tensor:
    """After a model's forward through its MoE `layers`: leave their auxiliary losses summed in
    `model.aux_loss` (detached, reported apart) and, while training, the routing training logs in
    `model.routing` (the tokens per expert summed over the layers, then the dropped assignments;
    float32) and the losses added to the loss `out` (when `has_targets`). Evaluation and decoding
    keep the token loss alone."""
    aux = sum(m.aux_loss for m in layers)
    model.aux_loss = aux.detach()
    if not model.training:
        return out
    loads = sum(m.stats["tokens_per_expert"] for m in layers).float()
    model.routing = torch.cat([loads, loads.new_tensor([sum(m.stats["dropped"] for m in layers)])])
    return out + aux if has_targets else out


def _slices(counts: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each expert's slice of the assignments sorted by expert."""
    return [(end - n, end) for n, end in zip(counts, itertools.accumulate(counts))]
