"""Memory, FLOPs, time, cost and energy of a model, as pure functions of its config and numbers.

Memory follows the accounting of Rajbhandari et al. 2020 (ZeRO, Sec. 3.1: 2 + 2 + K bytes per
parameter under mixed-precision Adam, K = 12) and Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", Sec. 4.1) for activations, counted here tensor by
tensor for llmlab's blocks (SwiGLU or GELU MLP, grouped-query attention, fused SDPA that stores
no attention matrix unless `flash=False`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

from llmlab.common import LlmlabError

# bytes per parameter; "4bit" is NF4 with double-quantised block scales: 4.127 bits
# (Dettmers et al. 2023, QLoRA, Sec. 3)
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "4bit": 4.127 / 8}
# optimizer state bytes per trainable parameter
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "sgd": 4.0}
PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day
# A training process on a CPU holds more than its tensors. Its first step pages in torch's kernels
# (measured here: 88 MiB over the resident size before the model is built, with a one-layer model).
# And glibc's allocator keeps freed blocks in its heaps: after a few steps the resident size settles
# above the live tensors by 0.48-0.82 of the activations (six fp32 AdamW runs, 1.4M to 72M
# parameters, 256 to 4,096 tokens per step; `benchmarks/plan_accuracy.py` checks three of them).
CPU_RUNTIME_BYTES = 90 * 2**20
CPU_ALLOCATOR_RETENTION = 0.65


class PlanError(LlmlabError):
    """A planner input out of range (a size <= 0, an unknown precision, ...)."""


class Shape(NamedTuple):
    """What the estimates need to know of a model."""

    params: int  # total
    non_embedding: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    gated_mlp: bool  # SwiGLU (three matrices) rather than a two-matrix GELU MLP


def shape_of(cfg) -> Shape:
    """The Shape of any model config (`llmlab.models.ModelConfig`). An encoder-decoder counts the
    blocks of both stacks as its layers: a batch of input and target pairs of seq_len tokens each
    holds the activations of the encoder's layers over the inputs and the decoder's over the targets
    (the decoder's cross-attention is not counted separately)."""
    count, attention = cfg.num_params(), cfg.attention_shape()
    layers = cfg.n_layers + (cfg.n_decoder_layers if getattr(cfg, "encoder_decoder", False) else 0)
    return Shape(count.total, count.non_embedding, cfg.dim, layers, attention.n_heads, attention.n_kv_heads,
                 attention.head_dim, cfg.hidden_dim, cfg.vocab_size, attention.gated_mlp)


def _show(value: float) -> str:
    """`value` to 3 significant digits, also an int too large for a float."""
    try:
        return f"{value:.3g}"
    except OverflowError:
        digits = str(abs(value))
        mantissa = f"{digits[0]}.{digits[1:3]}".rstrip("0").rstrip(".")
        return f"{'-' if value < 0 else ''}{mantissa}e+{len(digits) - 1}"


def finite(name: str, value: float) -> float:
    """`value` when it is a finite real number; else a PlanError naming `name`."""
    try:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        shown = _show(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else repr(value)
        raise PlanError(f"{name} must be a finite number, got {shown}")
    return value


def positive(name: str, value: float, *, at_most: float = math.inf) -> float:
    """`value` when it is a finite number > 0 and <= `at_most`; else a PlanError naming `name`."""
    finite(name, value)
    if not value > 0:
        raise PlanError(f"{name} must be positive, got {_show(value)}")
    if value > at_most:
        raise PlanError(f"{name} must be at most {at_most:.3g}, got {_show(value)}")
    return value


def non_negative(name: str, value: float) -> float:
    """`value` when it is a finite number >= 0; else a PlanError naming `name`."""
    if finite(name, value) < 0:
        raise PlanError(f"{name} must be >= 0, got {_show(value)}")
    return value


def count(name: str, value: int, *, minimum: int = 1, at_most: float = math.inf) -> int:
    """`value` when it is an int in [`minimum`, `at_most`] (a batch, a device count, a rank); else a PlanError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PlanError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise PlanError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {_show(value)}")
    if value > at_most:
        raise PlanError(f"{name} must be at most {at_most:.3g}, got {_show(value)}")
    return value


def check_mfu(name: str, mfu: float) -> float:
    """Model FLOPs utilisation is a fraction of the peak: in (0, 1]."""
    if not 0 < finite(name, mfu) <= 1:
        raise PlanError(f"{name} must be in (0, 1] (a fraction of the peak), got {mfu:.3g}")
    return mfu


def check_pue(name: str, pue: float) -> float:
    """Power usage effectiveness is the facility's power over the devices' power: >= 1."""
    if not finite(name, pue) >= 1:
        raise PlanError(f"{name} must be >= 1 (the facility's power over the devices' power), got {pue:.3g}")
    return pue


def precision_bytes(precision: str) -> float:
    if precision not in PRECISION_BYTES:
        raise PlanError(f"unknown precision {precision!r}; known: {', '.join(PRECISION_BYTES)}")
    return PRECISION_BYTES[precision]


# --------------------------------------------------------------------------- FLOPs


def training_flops(flops_per_token: float, tokens: float) -> float:
    """Forward + backward FLOPs for `tokens` (6 N D plus the attention term, Kaplan et al. 2020)."""
    return positive("flops per token", flops_per_token) * positive("tokens", tokens)


def pf_days(flops: float) -> float:
    return flops / PF_DAY


# --------------------------------------------------------------------------- memory


def weight_bytes(params: float, precision: str) -> float:
    return positive("params", params) * precision_bytes(precision)


def kv_cache_bytes(shape: Shape, batch: int, context: int, precision: str = "bf16") -> float:
    """Keys and values of every layer for `batch` sequences of `context` tokens."""
    count("batch", batch)
    count("context", context)
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * batch * context * precision_bytes(precision)


def activation_bytes(shape: Shape, batch: int, seq_len: int, precision: str = "bf16", *,
                     checkpointing: bool = False, flash: bool = True) -> float:
    """Activations kept for the backward pass of one micro-batch.

    Per token and layer (counted from the tensors autograd saves in llmlab's blocks): each of the
    two norms keeps its input, the normalised input and its output (3 d); attention keeps q, k, v,
    its output and that output re-laid for the output projection (3 q + 2 kv); the MLP keeps its
    inner tensors (4 h gated: gate, SiLU(gate), up and their product; 2 h for GELU: its input and
    output). Without a fused attention it also keeps the softmax probabilities (n_heads x seq_len).
    With checkpointing only each layer's input (d) is kept, plus one layer's full set while it is
    recomputed. The final norm adds 3 d.
    """
    tokens = count("batch", batch) * count("seq_len", seq_len)
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    per_layer = 6 * shape.dim + 3 * q + 2 * kv + (4 if shape.gated_mlp else 2) * shape.hidden_dim
    if not flash:
        per_layer += shape.n_heads * seq_len
    stored = shape.dim * shape.n_layers + per_layer if checkpointing else per_layer * shape.n_layers
    return tokens * (stored + 3 * shape.dim) * precision_bytes(precision)


def lora_params(shape: Shape, rank: int) -> int:
    """Trainable parameters of rank-r adapters on every linear layer of every block (A: r x in, B: out x r)."""
    count("lora rank", rank)
    d, q, kv, h = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, shape.hidden_dim
    attn = (d + q) + 2 * (d + kv) + (q + d)
    mlp = (3 if shape.gated_mlp else 2) * (d + h)
    return shape.n_layers * rank * (attn + mlp)


@dataclass
class TrainingMemory:
    """Bytes per device, by component."""

    weights: float
    master_weights: float  # fp32 copy under mixed precision
    gradients: float
    optimizer: float
    activations: float
    trainable_params: float
    runtime: float = 0.0  # on a CPU: torch's kernels and the freed memory the allocator keeps

    @property
    def total(self) -> float:
        return self.weights + self.master_weights + self.gradients + self.optimizer + self.activations + self.runtime


def cpu_runtime_bytes(activations: float) -> float:
    """What a CPU training process holds beyond its tensors, for `activations` bytes of activations:
    torch's kernels and the share of freed activation memory glibc keeps (see CPU_RUNTIME_BYTES)."""
    return CPU_RUNTIME_BYTES + CPU_ALLOCATOR_RETENTION * activations


def training_memory(shape: Shape, *, batch: int, seq_len: int, precision: str = "bf16", optimizer: str = "adamw",
                    checkpointing: bool = False, lora_rank: int = 0, qlora: bool = False, zero_stage: int = 0,
                    devices: int = 1, cpu: bool = False) -> TrainingMemory:
    """Peak training memory per device; with `cpu`, plus what a CPU process holds beyond its tensors.

    precision "fp32" trains in fp32; "bf16"/"fp16" is mixed precision: 16-bit weights and gradients
    plus fp32 master weights. With `lora_rank` the base weights are frozen (no gradients, no
    optimizer state) and only the adapters train; `qlora` stores the base in 4 bits. ZeRO stage 1
    shards optimizer states over `devices`, stage 2 also gradients, stage 3 (= FSDP) also weights.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise PlanError(f"training precision must be fp32, bf16 or fp16, got {precision!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise PlanError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_BYTES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    count("lora_rank", lora_rank, minimum=0)
    if qlora and not lora_rank:
        raise PlanError("qlora needs a lora_rank > 0")
    count("devices", devices)
    p = precision_bytes(precision)
    mixed = precision != "fp32"
    trainable = lora_params(shape, lora_rank) if lora_rank else shape.params
    base = weight_bytes(shape.params, "4bit" if qlora else precision) if lora_rank else 0.0
    weights = base + trainable * p
    master = trainable * 4 if mixed else 0.0
    grads = trainable * p
    states = trainable * OPTIMIZER_BYTES[optimizer]
    if zero_stage >= 1:
        states, master = states / devices, master / devices
    if zero_stage >= 2:
        grads /= devices
    if zero_stage >= 3:
        weights /= devices
    acts = activation_bytes(shape, batch, seq_len, precision, checkpointing=checkpointing)
    return TrainingMemory(weights, master, grads, states, acts, trainable, cpu_runtime_bytes(acts) if cpu else 0.0)


# --------------------------------------------------------------------------- time, cost, energy


@dataclass
class RunCost:
    hours: float  # wall-clock
    device_hours: float
    cost: float  # USD
    energy_kwh: float  # devices' power x hours x PUE
    co2_kg: float


def run_cost(flops: float, peak_flops: float, *, devices: int = 1, mfu: float = 0.4, price_per_hour: float = 0.0,
             power_watts: float = 0.0, pue: float = 1.1, grid_kg_per_kwh: float = 0.4) -> RunCost:
    """Time at model FLOPs utilisation `mfu`, cost, energy and CO2 of `flops`.

    Energy counts the devices' board power times the data centre's PUE (Patterson et al. 2021,
    "Carbon Emissions and Large Neural Network Training"); CO2 is energy times the grid's intensity.
    """
    positive("flops", flops)
    positive("peak flops", peak_flops)
    count("devices", devices)
    check_mfu("mfu", mfu)
    non_negative("price_per_hour", price_per_hour)
    non_negative("power_watts", power_watts)
    check_pue("pue", pue)
    non_negative("grid_kg_per_kwh", grid_kg_per_kwh)
    hours = flops / (devices * peak_flops * mfu) / 3600
    device_hours = hours * devices
    energy = device_hours * power_watts / 1000 * pue
    return RunCost(hours, device_hours, device_hours * price_per_hour, energy, energy * grid_kg_per_kwh)
