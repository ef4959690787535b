"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a module swap.

A targeted linear layer W (out, in) is wrapped so that

    y = x W^T + b + s * dropout(x) A^T B^T,    A: (r, in), B: (out, r), s = alpha / r

with W frozen and only A and B trained. B starts at zero, so the wrapped model starts as the
base model exactly. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead, which keeps
the update's size stable as r grows. Merging folds s * B A into W for inference at no extra cost;
unmerging subtracts it again. The parameter names (`<module>.lora_A.weight`, `.lora_B.weight`)
are PEFT's, so adapters convert to and from PEFT's format by renaming the module path only.
The base may be a 4-bit `NF4Linear` (QLoRA); merging then dequantizes it. It may also be a stack
of E expert projections (`ExpertLinear`, or its 4-bit `NF4Experts`) called as `layer(x, e)`; each
expert then has its own A and B, stacked as (E, r, in) and (E, out, r).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from llmlab.common import LlmlabError


class AdapterError(LlmlabError):
    """An adapter that does not fit the model, or a LoRA setting that cannot be honoured."""


class LoraSettingError(AdapterError, ValueError):
    """A LoraConfig value out of range: an AdapterError to code that builds the config, and a ValueError
    so that a config file or override naming it is reported with its key (`llmlab.config`)."""


@dataclass
class LoraConfig:
    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names or "all-linear"
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)

    def __post_init__(self):
        if self.r < 1:
            raise LoraSettingError(f"r must be a rank >= 1, got {self.r}")
        if not self.alpha > 0:  # the update's scale: 0 would train adapters that never act
            raise LoraSettingError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraSettingError(f"dropout must be a probability in [0, 1), got {self.dropout}")
        if not self.targets or not all(self.targets):
            raise LoraSettingError(f"targets must name the modules to adapt (e.g. [q_proj, v_proj]) or be "
                                   f"[all-linear], got {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen linear layer `base` plus a trainable low-rank update (see the module docstring); for a
    base of stacked experts, one update per expert, and `forward(x, e)`."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n_experts = getattr(base, "n_experts", None)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        weight = _weight(base)
        device = (weight if weight is not None else next(base.buffers())).device  # a 4-bit base has buffers
        self.lora_A = self._factor(self.in_features, r, device)
        self.lora_B = self._factor(r, self.out_features, device)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora()

    def _factor(self, n_in: int, n_out: int, device: torch.device) -> nn.Module:
        if self.n_experts is None:
            return nn.Linear(n_in, n_out, bias=False, device=device)
        from llmlab.models.moe import ExpertLinear

        return ExpertLinear(self.n_experts, n_in, n_out).to(device)

    def reset_lora(self) -> None:
        """A as nn.Linear's default (Kaiming uniform, a = sqrt(5), as PEFT), each expert's on its own;
        B = 0, so the update is zero."""
        for a in self.lora_A.weight.data.view(-1, self.r, self.in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update s * B A as an (out, in) matrix, or (E, out, in) for experts."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor, *expert: int) -> torch.Tensor:
        y = self.base(x, *expert)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight[expert].to(x.dtype)  # an empty index: the whole matrix
        b = self.lora_B.weight[expert].to(x.dtype)
        return y + (self.dropout(x) @ a.t() @ b.t()) * self.scaling  # (..., in) -> (..., r) -> (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = _weight(self.base)
        if weight is None:
            raise AdapterError("cannot merge into a quantized base in place; use merge_and_unload(), which "
                               "dequantizes it")
        weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = _weight(self.base)
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def merged_linear(self) -> nn.Module:
        """A plain linear layer (or expert stack) holding W + s B A (the base dequantized first when it
        is 4-bit)."""
        from llmlab.models.moe import plain_layer

        weight = _weight(self.base)
        weight = self.base.dequantize() if weight is None else weight.detach()
        with torch.no_grad():
            merged = weight if self.merged else weight + self.delta_weight().to(weight.dtype)
        return plain_layer(merged, getattr(self.base, "bias", None))

    def extra_repr(self) -> str:
        experts = f", n_experts={self.n_experts}" if self.n_experts else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}{experts}" + (
            ", merged" if self.merged else "")


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The full-precision weight of a linear layer, or None for a quantized one."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's linear layers and expert stacks, full-precision or 4-bit; a
    LoRA-wrapped layer counts once, under its own name."""
    from llmlab.models.moe import ExpertLinear
    from llmlab.quant import NF4Experts, NF4Linear

    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, (nn.Linear, NF4Linear, ExpertLinear, NF4Experts, LoRALinear)):
                names.append(name)  # not its parts: a 4-bit stack's experts, a LoRA layer's base and factors
            else:
                visit(child, name + ".")

    visit(model, "")
    return names


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Qualified names of the linear layers `targets` selects.

    Each target is a module name (`q_proj`), a dotted suffix (`attn.q_proj`, `layers.0.mlp.up_proj`),
    or `all-linear`: every linear layer but the output head (PEFT's meaning). A target that selects
    nothing is an error, so a typo never trains a model with no adapters.
    """
    linears = linear_names(model)
    if "all-linear" in targets:
        return [n for n in linears if n.split(".")[-1] != "lm_head"]
    chosen = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            leaves = sorted({n.split(".")[-1] for n in linears})
            raise AdapterError(f"lora target {target!r} matches no linear layer; the model has: {', '.join(leaves)}")
        chosen += hits
    return sorted(set(chosen), key=linears.index)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the targeted linear layers of `model` in place and freeze everything but the adapters.

    Returns the wrapped module names. Adapters are created on each base layer's device in fp32.
    """
    names = target_names(model, cfg.targets)
    wrapped = [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]
    if wrapped:
        raise AdapterError(f"{', '.join(wrapped[:5])} already carry an adapter")
    experts = [n for n in names if getattr(model.get_submodule(n), "n_experts", None)]
    if experts and cfg.dropout:  # as PEFT, whose adapters on stacked experts have no dropout
        raise AdapterError(f"lora dropout must be 0 when the targets include stacked experts ({experts[0]}): set "
                           "lora.dropout=0, or leave the experts out of lora.targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), cfg.r, cfg.alpha, cfg.dropout, cfg.rslora))
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`."""
    return {f"{name}.{part}.weight": getattr(m, part).weight.detach().cpu().contiguous()
            for name, m in lora_layers(model) for part in ("lora_A", "lora_B")}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into the model's LoRA layers, strictly: every adapter layer must receive
    both tensors with the right shapes, and every tensor must have a home."""
    expected = {f"{name}.{part}.weight": getattr(m, part).weight
                for name, m in lora_layers(model) for part in ("lora_A", "lora_B")}
    problems = [f"missing {key}" for key in expected if key not in state]
    problems += [f"unexpected {key} (the model has no such adapter layer)" for key in state if key not in expected]
    problems += [f"{key}: shape {tuple(state[key].shape)}, but the model's layer needs {tuple(t.shape)} "
                 "(an adapter trained for another base?)"
                 for key, t in expected.items() if key in state and state[key].shape != t.shape]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise AdapterError(f"{source}: the adapter does not fit the model: " + "; ".join(problems[:5]) + more)
    with torch.no_grad():
        for key, t in expected.items():
            t.copy_(state[key])


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (outputs unchanged up to rounding, no extra cost)."""
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`: the base weights get back their values (up to rounding)."""
    for _, m in lora_layers(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain linear layer holding W + s B A, in place; returns the model.
    4-bit bases are dequantized, so the result is an ordinary full-precision model."""
    for name, m in list(lora_layers(model)):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.merged_linear())
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every LoRA layer skips its update (the reference model
    DPO and PPO need, with no second copy of the weights)."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise AdapterError("disable_adapters() on a merged model: unmerge it first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.disabled = was


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized base counts its logical size."""
    from llmlab.quant import NF4Linear

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total

