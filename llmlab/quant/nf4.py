"""4-bit NormalFloat (NF4) linear layers: the frozen base of QLoRA, as a module swap on a built model.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314). Each block of
`blocksize` consecutive weights (in row-major order of the (out, in) matrix) is scaled by its absolute
maximum a and every value w is stored as the index of the nearest of 16 NF4 code values q_i (the quantiles
of a standard normal, rescaled to [-1, 1]):  w ~ a * q_i. Double quantization (Sec. 3) stores the absmax
constants themselves in 8 bits: their mean is subtracted and the rest is quantized blockwise (256 per
block) with bitsandbytes' 8-bit dynamic code. The packing, the kernels and the 8-bit code are bitsandbytes'.

Three entry points:
- `NF4Linear`: one frozen 4-bit layer; `forward` runs `bitsandbytes.matmul_4bit` in `compute_dtype` (on
  CPU, a matmul with the dequantized weight, as bitsandbytes does there);
  `NF4Experts`: a stack of MoE experts, one NF4Linear each.
- `quantize_model`: swap every linear layer of a built model (but `lm_head` and routers) for an NF4Linear (and
  every stack of experts for an NF4Experts), in place.
- `load_quantized`: read a checkpoint one tensor at a time and quantize as it goes, so the full-precision
  model never exists in memory.

The packed 4-bit weights are not part of a state_dict: quantization is deterministic, so a QLoRA base is
re-created from its full-precision checkpoint with `load_quantized`, and only the adapters are saved.
bitsandbytes is imported inside functions, since importing it takes seconds.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from llmlab.models import build_model
from llmlab.models.convert import ConversionError, hf_to_llmlab_state, table_for
from llmlab.models.moe import ExpertLinear, plain_layer
from llmlab.models.io import (INDEX, WEIGHTS, CheckpointError, check_state, meta_parameters, read_config,
                              read_shard_index)

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState

# The 16 NF4 code values (QLoRA, Appendix E; `bitsandbytes.functional.get_4bit_type("nf4")`), ascending.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
# layers kept in full precision by default: the output head, and an MoE's router (whose small logits
# pick the experts; transformers' Mixtral router is no linear layer, so bitsandbytes leaves it too)
KEEP = ("lm_head", "router")
# blocks of absmax constants that share one second-level scale under double quantization (bitsandbytes)
ABSMAX_BLOCKSIZE = 256


def _bitsandbytes():
    import bitsandbytes  # lazily: the import costs seconds

    return bitsandbytes


# --------------------------------------------------------------------------- the layer


class NF4Linear(nn.Module):
    """A frozen linear layer y = x W^T + b whose weight W (out, in) is stored in 4-bit NF4.

    The packed weight is a uint8 buffer `packed_weight` ((out * in + 1) // 2, 1), two codes per byte, kept
    out of the state_dict (persistent=False): see the module docstring. bitsandbytes' `QuantState` (the
    absmax constants, the code tables, the shape) lives beside it in `quant_state`; `_apply` moves it
    with the module, so `.to(device)` and `.cuda()` move both. Dtype casts of the module (`.half()`)
    change only the bias: the arithmetic precision is `compute_dtype`. The layer has no trainable
    parameters (the bias is frozen), and gradients flow to the input only, as QLoRA needs.
    """

    def __init__(self, packed_weight: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None, *,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in quant_state.shape)
        self.blocksize = int(quant_state.blocksize)
        self.double_quant = bool(quant_state.nested)
        self.compute_dtype = compute_dtype
        self.quant_state = quant_state
        self.register_buffer("packed_weight", packed_weight, persistent=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), requires_grad=False))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> NF4Linear:
        """Quantize a full-precision (out, in) weight on its own device. Deterministic: the same weight
        gives the same packed bytes and constants."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        if weight.is_meta:
            raise ValueError("cannot quantize a weight on the meta device; load real weights first")
        functional = _bitsandbytes().functional
        packed, state = functional.quantize_4bit(weight.detach().contiguous(), blocksize=blocksize,
                                                 compress_statistics=double_quant, quant_type="nf4")
        state.dtype = compute_dtype  # what dequantize_4bit returns
        return cls(packed, state, bias, compute_dtype=compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> NF4Linear:
        """The NF4 version of `linear` (its weight quantized, its bias kept in full precision, frozen)."""
        return cls.from_weight(linear.weight, linear.bias, blocksize=blocksize, double_quant=double_quant,
                               compute_dtype=compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self.packed_weight.device.type == "cpu":  # what bitsandbytes does on CPU, with a right dequantize
            return F.linear(x.to(self.compute_dtype), self.dequantize(), bias).to(x.dtype)
        # the transposed view is bitsandbytes' calling convention for an (out, in) weight
        y = _bitsandbytes().matmul_4bit(x.to(self.compute_dtype), self.packed_weight.t(), self.quant_state,
                                        bias=bias)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight the layer computes with, (out, in) in compute_dtype.

        Dequantized as one flat row: bitsandbytes' CPU kernel (0.50) restarts the blocks at each row of
        a 2-D shape, which misplaces every scale when `in_features` is not a multiple of the block size."""
        state = copy.copy(self.quant_state)
        state.shape = torch.Size([self.out_features * self.in_features])
        weight = _bitsandbytes().functional.dequantize_4bit(self.packed_weight, state)
        return weight.reshape(self.out_features, self.in_features).to(self.compute_dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Linear:
        super()._apply(fn, recurse)
        self.quant_state.to(self.packed_weight.device)  # in place: absmax, codes, offset
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class NF4Experts(nn.Module):
    """A frozen stack of E expert projections (an `ExpertLinear`) in 4-bit: one NF4Linear per expert,
    each quantized on its own (E, out, in) slice; `forward(x, e)` runs expert e."""

    def __init__(self, experts: list[NF4Linear]):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.n_experts = len(experts)
        self.in_features, self.out_features = experts[0].in_features, experts[0].out_features

    @classmethod
    def from_weight(cls, weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> NF4Experts:
        """Quantize a full-precision (E, out, in) stack, expert by expert."""
        if weight.dim() != 3:
            raise ValueError(f"NF4Experts needs a 3-D (experts, out, in) weight, got shape {tuple(weight.shape)}")
        return cls([NF4Linear.from_weight(w, blocksize=blocksize, double_quant=double_quant,
                                          compute_dtype=compute_dtype) for w in weight])

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.experts[e](x)

    def dequantize(self) -> torch.Tensor:
        """The weights the stack computes with, (E, out, in) in compute_dtype."""
        return torch.stack([expert.dequantize() for expert in self.experts])


def nf4_error_bound(weight: torch.Tensor, blocksize: int = 64, *, double_quant: bool = True) -> torch.Tensor:
    """The elementwise bound on |dequantize(quantize(W)) - W| that the NF4 code guarantees, W's shape.

    A value rounds to the nearest NF4 code value, so in a block with absmax a its error is at most
    a * g4 / 2, with g4 the largest gap between adjacent code values (0.3038, between -1 and -0.6962).
    With double quantization the block is rescaled by an approximate absmax a' instead of a; a' - m is the
    8-bit dynamic-code quantization of a - m (m the mean absmax of the tensor) with scale
    S = max |a - m| over the block's group of 256 absmax values. Since every |q_i| <= 1 this adds at most
    |a' - a| <= g8 * S, where g8 is the largest gap of the dynamic code (0.0141; it also covers the
    ends of [-1, 1] that the code leaves out). The full gap, not half of it, because bitsandbytes' CPU
    kernel rounds to one of the two neighbouring codes but not always the nearest (past a midpoint by
    about 0.1% of a gap). The slack is thus at most 1.4% of the largest absmax deviation in the group,
    about a tenth of the 4-bit term. Sixteen float32 ulps of the largest absmax cover the rounding of
    the scale and rescale products.

    Args:
        weight: the full-precision tensor (any shape; blocks run over its row-major flattening).
        blocksize: the NF4 block size used to quantize it.
        double_quant: whether the absmax constants were themselves quantized.
    """
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    absmax = F.pad(flat.abs(), (0, n_blocks * blocksize - n)).view(n_blocks, blocksize).amax(1)
    code = torch.tensor(NF4_CODE)
    bound = absmax * float(code.diff().max()) / 2
    if double_quant:
        dynamic = _bitsandbytes().functional.create_dynamic_map(signed=True)
        g8 = max(float(dynamic.diff().max()), 1 + float(dynamic.min()), 1 - float(dynamic.max()))
        deviation = (absmax - absmax.mean()).abs()
        n_groups = -(-n_blocks // ABSMAX_BLOCKSIZE)
        group_max = F.pad(deviation, (0, n_groups * ABSMAX_BLOCKSIZE - n_blocks)).view(n_groups, -1).amax(1)
        bound = bound + g8 * group_max.repeat_interleave(ABSMAX_BLOCKSIZE)[:n_blocks]
    bound = bound + 16 * torch.finfo(torch.float32).eps * absmax.max()
    return bound.repeat_interleave(blocksize)[:n].view(weight.shape)


# --------------------------------------------------------------------------- model swaps


def _skipped(name: str, skip: Sequence[str]) -> bool:
    # whole dotted components: "lm_head" skips "lm_head" and "x.lm_head", not "xlm_head"
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, *, skip: Sequence[str] = KEEP, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every `nn.Linear` (llmlab's `Linear` included) whose qualified name does not end with one
    of `skip` by an NF4Linear, and every stack of experts by an NF4Experts, in place; returns the
    replaced names in module order.

    The full-precision weights are dropped with their layers (and freed unless referenced elsewhere,
    as a tied embedding is). The new layers' biases are frozen; other parameters keep their flags.
    A linear layer shared between two places stays shared: it is quantized once.
    """
    quant = {"blocksize": blocksize, "double_quant": double_quant, "compute_dtype": compute_dtype}
    done: dict[int, nn.Module] = {}
    replaced = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not isinstance(module, (nn.Linear, ExpertLinear)) or _skipped(name, skip):
            continue
        if id(module) not in done:
            done[id(module)] = (NF4Linear.from_linear(module, **quant) if isinstance(module, nn.Linear)
                                else NF4Experts.from_weight(module.weight, **quant))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, done[id(module)])
        replaced.append(name)
    return replaced


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every NF4Linear (and NF4Experts) by a full-precision linear layer (or ExpertLinear)
    holding its dequantized weight, in place (to save or export a QLoRA model as an ordinary
    checkpoint); returns the model."""
    stacks = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (NF4Linear, NF4Experts)) or any(name.startswith(s + ".") for s in stacks):
            continue  # an expert of a stack being replaced whole
        if isinstance(module, NF4Experts):
            stacks.append(name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                plain_layer(module.dequantize(), getattr(module, "bias", None)))
    return model


# --------------------------------------------------------------------------- streaming load


def _weight_files(path: Path) -> tuple[dict[str, Path], str]:
    """Each stored tensor's safetensors file, and the file to name in errors (the index when sharded)."""
    if (path / INDEX).is_file():
        index_file = path / INDEX
        return {key: path / shard for key, shard in read_shard_index(index_file).items()}, str(index_file)
    if (path / WEIGHTS).is_file():
        return {key: path / WEIGHTS for key in _keys(path / WEIGHTS)}, str(path / WEIGHTS)
    raise CheckpointError(f"{path}: no safetensors weights found (expected {WEIGHTS} or {INDEX}); "
                          "load_quantized reads safetensors only, convert pickled weights first")


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _shapes(files: dict[str, Path], source: str) -> dict[str, torch.Tensor]:
    """Every stored tensor as a meta tensor of its shape, read from the file headers only."""
    out = {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if files.get(key) == file:
                        out[key] = torch.empty(f.get_slice(key).get_shape(), device="meta")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    absent = sorted(set(files) - set(out))
    if absent:
        raise CheckpointError(f"{source}: tensors listed in the index but absent from the shards: {absent[:10]}")
    return out


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    # one open per tensor: the mapping, and the page cache it pulled into this process, go with it
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: could not read tensor {key} ({e})") from None


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", *, skip: Sequence[str] = KEEP,
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an llmlab checkpoint or an HF-format folder (auto-detected) with its linear layers in NF4.

    Equal to `quantize_model(load_model(path), ...)`, bit for bit, but the full-precision model never
    exists: the model is built with its parameters on the meta device (buffers computed as usual),
    and the safetensors tensors are read one at a time, converted from HF names when needed, moved to
    `device`, and either quantized into an NF4Linear or put in place as a frozen parameter of the
    model's dtype. Peak memory is the 4-bit model plus about four times the largest tensor (read,
    cast to float32, and bitsandbytes' working copies). Every name and shape is checked against the
    config, from the file headers, before any tensor is read. Tied parameters stay tied; a stored copy
    of a tied parameter (an HF `lm_head.weight` next to tied embeddings) is ignored, as in `load_model`.

    Returns:
        the model in eval mode, on `device`, with every parameter's requires_grad False.

    Raises:
        CheckpointError: a missing, unreadable or mismatched file or tensor, named with the problem.
    """
    path = Path(path)
    cfg, kind = read_config(path)
    files, source = _weight_files(path)
    stored = _shapes(files, source)

    # stored key -> the llmlab names (and layouts) it becomes; GPT-2's fused qkv gives three
    if kind == "hf":
        table = table_for(cfg)
        if stored and not any(k.startswith(table.base_prefix) or k == "lm_head.weight" for k in stored):
            renamed = {table.base_prefix + k: k for k in stored}  # a bare base model, as hf_to_llmlab_state
        else:
            renamed = {k: k for k in stored}
        try:  # on meta tensors: checks every name before any data is read
            provided = hf_to_llmlab_state({k: stored[v] for k, v in renamed.items()}, cfg)
        except ConversionError as e:
            raise CheckpointError(f"{source}: {e}") from None
        convert = {v: (lambda t, k=k: hf_to_llmlab_state({k: t}, cfg)) for k, v in renamed.items()}
    else:
        provided = stored
        convert = {k: (lambda t, k=k: {k: t}) for k in stored}

    with meta_parameters():
        model = build_model(cfg)
    names_of: dict[int, list[str]] = {}  # tied parameters share one entry: [canonical, aliases ...]
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    aliases = {n for names in names_of.values() for n in names[1:]}
    expected = {names[0]: model.get_parameter(names[0]) for names in names_of.values()}
    expected.update((k, v) for k, v in model.state_dict(keep_vars=True).items()  # persistent buffers
                    if k not in expected and k not in aliases)
    check_state(provided, expected, source, ignored=aliases)
    targets = {name for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, ExpertLinear)) and not _skipped(name, skip)}
    group = {names[0]: names for names in names_of.values()}

    for key in sorted(stored, key=lambda k: (str(files[k]), k)):
        tensor = _read_tensor(files[key], key)
        for name, t in convert[key](tensor).items():
            if name in aliases:
                continue
            _place(model, group.get(name, [name]), t.to(device=device, dtype=expected[name].dtype), targets,
                   blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
        del tensor  # before the next read: one full-precision tensor at a time

    model.to(device)  # the buffers computed at build time
    model.requires_grad_(False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: tensors never loaded: {', '.join(left[:20])}")
    return model.eval()


def _place(model: nn.Module, names: list[str], tensor: torch.Tensor, targets: set[str], **quant) -> None:
    """Put one loaded tensor under all its (tied) names: a weight of a target linear layer becomes an
    NF4Linear (taking the layer's bias as it stands; a bias read later replaces it), anything else a
    frozen parameter shared by the names, or a buffer."""
    param = None
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if owner_name in targets and attr == "weight":
            parent, _, child = owner_name.rpartition(".")
            quantized = (NF4Linear.from_weight(tensor, owner.bias, **quant) if isinstance(owner, nn.Linear)
                         else NF4Experts.from_weight(tensor, **quant))
            setattr(model.get_submodule(parent), child, quantized)
        elif attr in owner._parameters:
            param = param if param is not None else nn.Parameter(tensor, requires_grad=False)
            setattr(owner, attr, param)
        else:
            owner.register_buffer(attr, tensor)
