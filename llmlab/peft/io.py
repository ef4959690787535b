"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names a tensor by the module path inside the HF model under `base_model.model.`, for example
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; llmlab's tensors are the same
matrices under llmlab's module path, so export and import rename paths through the conversion
table and copy the tensors unchanged. An adapter saved here loads with `peft.PeftModel` on the HF
export of the same base, and an adapter trained with `peft` loads here.

An MoE's stacked experts are parameters in HF (`mlp.experts.gate_up_proj`), which PEFT adapts through
`target_parameters`: one pair of matrices per stack, A (E * r, in) and B (out, r * E) with the rank
index before the expert's, where llmlab keeps A (E, r, in) and B (E, out, r). PEFT wraps the targeted
parameters of one module one inside the other, in the module's order, and each wrapper but the
outermost is reached through `base_layer.`: with both of Mixtral's stacks adapted, gate_up_proj's
tensors sit under `mlp.experts.base_layer.` and down_proj's under `mlp.experts.`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from llmlab.common import atomic_write_text
from llmlab.models.convert import ConversionError, module_name_map
from llmlab.models.io import save_safetensors
from llmlab.peft.lora import AdapterError, LoraConfig, apply_lora, linear_names, load_lora_state, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options that change what the adapter computes; an adapter using any of them is refused
UNSUPPORTED = {"use_dora": False, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "bias": "none", "layer_replication": None}


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(model: nn.Module, path: str | os.PathLike, cfg: LoraConfig, *, base: str = "") -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder; `base` is recorded as
    `base_model_name_or_path`. The weights are written before the config, each atomically, so a
    folder with a config always has its weights."""
    path = Path(path)
    family = model.config  # the layout may depend on more than the family (an encoder's head)
    mapped = []  # (layer, HF path, layout op)
    for name, layer in lora_layers(model):
        try:
            mapped.append((layer, *module_name_map(name, family, to_hf=True)))
        except ConversionError as e:
            raise AdapterError(f"cannot export the adapter in PEFT format: {e}") from None
    hf_names = [hf for layer, hf, _ in mapped if not layer.n_experts]
    hf_params = [hf for layer, hf, _ in mapped if layer.n_experts]
    ops = {op for layer, _, op in mapped if not layer.n_experts}
    tensors = {}
    for layer, hf, _ in mapped:
        a, b = layer.lora_A.weight.detach().cpu(), layer.lora_B.weight.detach().cpu()
        if layer.n_experts:  # to PEFT's layout, under the key its nesting gives
            hf = _nested_key(hf, [p for p in hf_params if p.rpartition(".")[0] == hf.rpartition(".")[0]])
            a, b = a.reshape(-1, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], -1)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    if not mapped:
        raise AdapterError("the model has no LoRA layers to save")
    if len(ops) > 1:
        raise AdapterError("cannot export in PEFT format: the adapted layers mix Linear and Conv1D layouts in HF")
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": _peft_targets(model, family, hf_names) if hf_names else [],
        "target_parameters": _peft_targets(model, family, hf_params, depth=2) if hf_params else None,
        "fan_in_fan_out": ops == {"transpose"},
        "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return path


def _nested_key(hf: str, params: list[str]) -> str:
    """Where PEFT keeps the adapter of experts parameter `hf` among the adapted `params` of its
    module (in the module's order): one `base_layer.` per wrapper outside its own."""
    module, _, _ = hf.rpartition(".")
    return module + ".base_layer" * (len(params) - 1 - params.index(hf))


def _peft_targets(model: nn.Module, family, hf_names: list[str], depth: int = 1) -> list[str]:
    """The last `depth` parts of the names (q_proj, v_proj; experts.gate_up_proj for stacks of
    experts) when they select exactly the adapted layers in the HF model, else the full paths (an
    adapter on some layers only)."""
    def leaf(name: str) -> str:
        return ".".join(name.split(".")[-depth:])

    leaves = sorted({leaf(n) for n in hf_names})
    selected = set()
    for name in linear_names(model):
        try:
            hf, _ = module_name_map(name, family, to_hf=True)
        except ConversionError:
            continue
        if leaf(hf) in leaves:
            selected.add(hf)
    return leaves if selected == set(hf_names) else sorted(hf_names)


def read_adapter_config(path: str | os.PathLike) -> dict:
    file = Path(path) / ADAPTER_CONFIG
    if Path(path).exists() and not Path(path).is_dir():
        raise AdapterError(f"{path}: not an adapter folder (a file; name the folder holding {ADAPTER_CONFIG})")
    if file.exists() and not file.is_file():
        raise AdapterError(f"{file}: not a regular file")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: not an adapter folder (no {ADAPTER_CONFIG})") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read the adapter config ({e})") from None
    except RecursionError:
        raise AdapterError(f"{file}: cannot read the adapter config (nested too deeply)") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type must be LORA, got {config.get('peft_type')!r}")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout") or 0.0
    if not _is_number(r) or r != int(r) or r < 1:
        raise AdapterError(f"{file}: r must be a whole number >= 1, got {r!r}")
    if not _is_number(alpha) or alpha <= 0:
        raise AdapterError(f"{file}: lora_alpha must be a positive number, got {alpha!r}")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise AdapterError(f"{file}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{file}: use_rslora must be true or false, got {config['use_rslora']!r}")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, [], False):
            raise AdapterError(f"{file}: {key}={config[key]!r} is not supported (only plain LoRA adapters load)")
    return config


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_adapter(path: str | os.PathLike, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config and its tensors under llmlab module names (and layouts) for `model`."""
    path = Path(path)
    config = read_adapter_config(path)
    if (path / ADAPTER_WEIGHTS).exists() and not (path / ADAPTER_WEIGHTS).is_file():  # a FIFO would block
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: not a regular file")
    try:
        raw = load_file(path / ADAPTER_WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: cannot read the adapter weights ({e})") from None
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path / ADAPTER_CONFIG}: target_parameters must be a list of parameter names, "
                           f"got {targets!r}")
    stacks = _expert_stacks(model, targets)
    parsed = []  # (HF module path, or parameter path for experts, "lora_A" | "lora_B", tensor)
    for key, tensor in raw.items():
        module, dot, part = key.removeprefix(PREFIX).removesuffix(".weight").rpartition(".")
        if not dot or part not in ("lora_A", "lora_B") or not key.startswith(PREFIX):
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {key} (expected "
                               f"{PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        depth = len(re.search(r"(\.base_layer)*$", module)[0]) // len(".base_layer")
        owner = module[:len(module) - depth * len(".base_layer")]
        if owner in stacks and depth < len(stacks[owner]):  # PEFT's layout of a stack of experts
            module = stacks[owner][len(stacks[owner]) - 1 - depth]
            n_experts = model.get_submodule(module_name_map(module, model.config, to_hf=False)[0]).n_experts
            if tensor.ndim != 2 or tensor.shape[0 if part == "lora_A" else 1] % n_experts:
                raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, not a stack "
                                   f"of {n_experts} experts' {part} (PEFT's (E * r, in) and (out, r * E))")
            tensor = (tensor.view(n_experts, -1, tensor.shape[-1]) if part == "lora_A"
                      else tensor.view(tensor.shape[0], -1, n_experts).permute(2, 0, 1).contiguous())
        parsed.append((module, part, tensor))
    params = {p for ps in stacks.values() for p in ps}
    if config.get("target_modules") or not params:
        _check_targets(path, config.get("target_modules"), [m for m, _, _ in parsed if m not in params])
    if params:
        _check_targets(path, config["target_parameters"], [m for m, _, _ in parsed if m in params],
                       key="target_parameters")
    ranks = {t.shape[-2 if part == "lora_A" else -1] for _, part, t in parsed if t.ndim}
    if ranks != {config["r"]}:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: r={config['r']!r}, but the tensors of {ADAPTER_WEIGHTS} have "
                           f"rank {', '.join(map(str, sorted(ranks)))}")
    state = {}
    for module, part, tensor in parsed:
        try:
            name, _ = module_name_map(module, model.config, to_hf=False)
        except ConversionError as e:
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {e} (an adapter for another model family?)") from None
        state[f"{name}.{part}.weight"] = tensor
    return config, state


def _expert_stacks(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """HF experts module -> the HF paths of its stacks that `target_parameters` selects, in the
    model's order (PEFT's order of wrapping)."""
    stacks: dict[str, list[str]] = {}
    for name in linear_names(model):
        if getattr(model.get_submodule(name), "n_experts", None):
            hf, _ = module_name_map(name, model.config, to_hf=True)
            if any(hf == t or hf.endswith("." + t) for t in targets):
                stacks.setdefault(hf.rpartition(".")[0], []).append(hf)
    return stacks


def _check_targets(path: Path, targets: object, modules: list[str], key: str = "target_modules") -> None:
    """Refuse an adapter whose config's `target_modules` (or `target_parameters`) and tensors
    disagree: PEFT would wrap the modules the config selects and leave the others' tensors unused,
    or zero-initialised.

    PEFT selects a module whose path equals a listed name or ends with "." + it, or, for a string,
    whose path the regular expression matches in full (`check_target_module_exists`)."""
    config, weights = path / ADAPTER_CONFIG, ADAPTER_WEIGHTS
    modules = list(dict.fromkeys(modules))
    if isinstance(targets, str):
        if targets == "all-linear":
            return  # every linear layer but the output head: nothing to compare the tensors against
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise AdapterError(f"{config}: {key} {targets!r} is not a valid regular expression "
                               f"({e})") from None
        unselected = [m for m in modules if not pattern.fullmatch(m)]
        unused: list[str] = []
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        def selects(target: str, module: str) -> bool:
            return module == target or module.endswith("." + target)

        unselected = [m for m in modules if not any(selects(t, m) for t in targets)]
        unused = [t for t in targets if not any(selects(t, m) for m in modules)]
    else:
        raise AdapterError(f"{config}: {key} must be a list of module names or a regular expression, "
                           f"got {targets!r}")
    problems = []
    if unselected:
        problems.append(f"{weights} holds tensors for {_first(unselected)}, which {key} does not select")
    if unused:
        problems.append(f"{key} lists {_first(unused)}, for which {weights} holds no tensors")
    if problems:
        raise AdapterError(f"{config}: {key} {targets!r} does not match the adapter's tensors: "
                           + "; ".join(problems))


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> LoraConfig:
    """Wrap `model`'s layers as the PEFT adapter at `path` says and load its tensors; returns the
    LoRA settings. Errors name the file and the first mismatches: a layer the model lacks, a shape
    that differs (an adapter trained on another base), a missing tensor."""
    config, state = read_adapter(path, model)
    modules = list(dict.fromkeys(key.rsplit(".", 2)[0] for key in state))
    cfg = LoraConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                     dropout=float(config.get("lora_dropout") or 0.0), targets=modules,
                     rslora=bool(config.get("use_rslora", False)))
    try:
        apply_lora(model, cfg)
    except AdapterError as e:
        raise AdapterError(f"{path}: the adapter does not fit the model: {e}") from None
    load_lora_state(model, state, str(Path(path) / ADAPTER_WEIGHTS))
    return cfg


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an adapter's tensors into a model whose LoRA layers are already in place (resuming)."""
    _, state = read_adapter(path, model)
    load_lora_state(model, state, str(Path(path) / ADAPTER_WEIGHTS))
