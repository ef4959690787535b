"""`llmlab plan`: a model (preset, config file, parameter count or FLOP budget) -> the numbers to
know before training it."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from llmlab.common import LlmlabError
from llmlab.data.ingest import check_input
from llmlab.plan import estimate as est
from llmlab.plan.estimate import PlanError
from llmlab.plan.hardware import CATALOG, get_hardware
from llmlab.plan.scaling import LAWS, config_for_params


MAX_PARAMS = 1e15  # a thousand times the largest dense models trained by 2025: past it no estimate means anything
MAX_TOKENS = 1e17  # some 10,000 times the largest training sets of 2025 (about 15T tokens)
MAX_FLOPS = 1e33  # about 6 N D at those two limits
MAX_COUNT = 10**9  # for a batch, context, vocabulary, device count or rank: far past any real run
SEQ_LEN = 2048  # training sequence length when none is given (or the model's context, if shorter)
VOCAB_SIZE = 32000  # vocabulary of a model sized from a count when none is given


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a preset name (see `llmlab demo` for the zoo) or a YAML config "
                   "(a model config, or a training config with a model: section)")
    g = p.add_argument_group("what to train")
    g.add_argument("--params", type=float, help="a bare parameter count, e.g. 7e9 (a LLaMA shape is chosen)")
    g.add_argument("--tokens", type=float, help="training tokens (default: the compute-optimal count)")
    g.add_argument("--budget-flops", type=float, help="a compute budget: size the model compute-optimally")
    g.add_argument("--law", choices=sorted(LAWS),
                   help="how a budget is split into parameters and tokens (default: tokens-per-param)")
    g.add_argument("--vocab-size", type=int, help=f"vocabulary of a model sized from a count (default {VOCAB_SIZE})")
    g.add_argument("--seq-len", type=int, help=f"training sequence length (default {SEQ_LEN}, or the model's "
                   "context if shorter)")
    g.add_argument("--batch", type=int, default=8, help="micro-batch per device (sequences)")
    g.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"), help="training precision")
    g.add_argument("--optimizer", default="adamw", choices=sorted(est.OPTIMIZER_BYTES))
    g.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    g.add_argument("--lora-rank", type=int, default=0, help="train rank-r LoRA adapters on a frozen base")
    g.add_argument("--qlora", action="store_true", help="with --lora-rank: a 4-bit base (QLoRA)")
    g.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage (3 = FSDP)")
    g = p.add_argument_group("hardware and cost")
    g.add_argument("--hardware", default="h100-80gb", help=f"one of {', '.join([*CATALOG, 'this-cpu'])}")
    g.add_argument("--devices", "--gpus", type=int, default=1, dest="devices",
                   help="devices training together (torchrun processes)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation assumed (default: the hardware's, 0.4 "
                   "for accelerators, 0.6 for this-cpu)")
    g.add_argument("--peak-tflops", type=float, help="override the device's peak")
    g.add_argument("--memory-gb", type=float, help="override the device's memory")
    g.add_argument("--price", type=float, help="USD per device-hour (default: the catalog's)")
    g.add_argument("--power", type=float, help="watts per device (default: the catalog's)")
    g.add_argument("--pue", type=float, default=1.1, help="data-centre power usage effectiveness (>= 1)")
    g.add_argument("--grid", type=float, default=0.4, help="grid carbon intensity, kg CO2 per kWh")
    g = p.add_argument_group("inference")
    g.add_argument("--context", type=int, help="KV-cache context length (default: --seq-len)")
    g.add_argument("--infer-batch", type=int, default=1, help="sequences decoded at once")
    p.add_argument("--write-config", metavar="PATH", help="write the model section of a pretrain config (YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace the file --write-config names if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_arguments(ns: argparse.Namespace) -> None:
    """Refuse, before any work, every flag out of range and every flag that another one contradicts
    or makes meaningless (PlanError naming the flag)."""
    if ns.model is None and ns.params is None and ns.budget_flops is None:
        raise PlanError("name a model (preset or config file), --params N or --budget-flops C")
    if ns.model is not None and ns.params is not None:
        raise PlanError(f"give a model or --params, not both (got {ns.model!r} and --params {ns.params:.3g})")
    if ns.budget_flops is not None and (ns.model is not None or ns.params is not None):
        raise PlanError("--budget-flops sizes the model compute-optimally, so it takes no model or --params; to plan "
                        "a given model, give its --tokens instead")
    if ns.budget_flops is not None and ns.tokens is not None:
        raise PlanError("--budget-flops sets the token count (C = 6 N D), so it takes no --tokens; give one of them")
    if ns.law is not None and ns.budget_flops is None:
        raise PlanError("--law splits a --budget-flops into parameters and tokens; it applies to --budget-flops only")
    if ns.vocab_size is not None and ns.model is not None:
        raise PlanError(f"--vocab-size applies to a model sized from --params or --budget-flops; {ns.model!r} "
                        "has its own vocabulary")
    if ns.qlora and not ns.lora_rank:
        raise PlanError("--qlora needs --lora-rank R > 0 (QLoRA trains rank-R adapters on a 4-bit base)")
    for name, limit in (("params", MAX_PARAMS), ("tokens", MAX_TOKENS), ("budget_flops", MAX_FLOPS)):
        if getattr(ns, name) is not None:
            est.positive(_flag(name), getattr(ns, name), at_most=limit)
    if ns.tokens is not None and ns.tokens < 1:
        raise PlanError(f"--tokens must be at least 1, got {ns.tokens:.3g}")
    for name in ("vocab_size", "seq_len", "batch", "devices", "infer_batch", "context"):
        if getattr(ns, name) is not None:
            est.count(_flag(name), getattr(ns, name), at_most=MAX_COUNT)
    est.count("--lora-rank", ns.lora_rank, minimum=0, at_most=MAX_COUNT)
    for name in ("peak_tflops", "memory_gb"):
        if getattr(ns, name) is not None:
            est.positive(_flag(name), getattr(ns, name))
    for name in ("price", "power", "grid"):
        if getattr(ns, name) is not None:
            est.non_negative(_flag(name), getattr(ns, name))
    est.check_pue("--pue", ns.pue)
    if ns.mfu is not None:
        est.check_mfu("--mfu", ns.mfu)


def _model_config(ns: argparse.Namespace, params: float | None, max_seq_len: int):
    from llmlab.config import from_dict
    from llmlab.models import REGISTRY
    from llmlab.models.presets import PRESETS, get_preset

    if ns.model is None:
        cfg = config_for_params(params, vocab_size=ns.vocab_size or VOCAB_SIZE, max_seq_len=max_seq_len)
        return cfg, f"a LLaMA shape for {params:.3g} parameters"
    if ns.model in PRESETS:
        return get_preset(ns.model), f"preset {ns.model}"
    path = Path(ns.model)
    if path.is_dir():
        raise PlanError(f"{path}: is a folder; expected a preset name or a YAML config file")
    if not os.path.lexists(path):
        raise PlanError(f"{ns.model!r} is neither a preset nor a file; presets: {', '.join(PRESETS)}")
    check_input(path)  # a loop of symbolic links, a FIFO whose reading would block, a device
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PlanError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise PlanError(f"{path}: nested too deeply to be a config") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise PlanError(f"{path}: {e}") from None
    if data is None or data == {}:
        raise PlanError(f"{path}: is empty; expected a model config (family, dim, n_layers, ...) or a model: section")
    section = data.get("model", data) if isinstance(data, dict) else None
    family = section.get("family", "llama") if isinstance(section, dict) else None
    if not isinstance(family, str) or family not in REGISTRY:
        raise PlanError(f"{path}: expected a model config (family: {' or '.join(REGISTRY)}) or a model: section")
    return from_dict(REGISTRY[family][0], {**section, "family": family}, source=str(path)), str(path)


def plan(ns: argparse.Namespace) -> dict:
    """Every estimate for the command line's arguments, as a JSON-ready dict (bytes, FLOPs, hours).

    Raises:
        LlmlabError: a flag out of range or contradicted by another (`check_arguments`), a model that
            cannot be read, or a sequence length, context or LoRA rank the model cannot take.
    """
    check_arguments(ns)
    law = ns.law or "tokens-per-param"
    optimal = {}
    if ns.budget_flops is not None:
        optimal = {name: dict(zip(("params", "tokens"), fn(ns.budget_flops))) for name, fn in LAWS.items()}
    params = ns.params
    if ns.model is None and params is None:
        params = optimal[law]["params"]
        if params > MAX_PARAMS:
            raise PlanError(f"--budget-flops {ns.budget_flops:.3g} buys {params:.3g} parameters under the {law} law, "
                            f"past the planner's range of {MAX_PARAMS:.3g}; lower the budget")
    sized_context = max(ns.seq_len or SEQ_LEN, ns.context or 0)
    cfg, source = _model_config(ns, params, sized_context)
    for name in ("seq_len", "context"):
        value = getattr(ns, name)
        if value is not None and value > cfg.max_seq_len:
            raise PlanError(f"{_flag(name)} {value} exceeds the context of {source} (max_seq_len {cfg.max_seq_len})")
    if ns.lora_rank > cfg.dim:
        raise PlanError(f"--lora-rank {ns.lora_rank} exceeds the model's width {cfg.dim}: a rank above a layer's "
                        "smaller side adds nothing")
    seq_len = ns.seq_len or min(SEQ_LEN, cfg.max_seq_len)
    shape = est.shape_of(cfg)
    if shape.params > MAX_PARAMS:
        raise PlanError(f"{source}: {shape.params:.3g} parameters, past the planner's range of {MAX_PARAMS:.3g}")
    per_token = cfg.flops_per_token(seq_len)
    if ns.tokens is not None:
        tokens = ns.tokens
    elif ns.budget_flops is not None:
        tokens = ns.budget_flops / per_token
    else:  # the compute-optimal rule of thumb, by the parameters a token uses: a sparse model is trained
        tokens = 20 * cfg.num_params().active  # as long as a dense one of its compute
    flops = est.training_flops(per_token, tokens)

    try:
        hw = get_hardware(ns.hardware, peak_flops=ns.peak_tflops and ns.peak_tflops * 1e12,
                          memory_bytes=ns.memory_gb and ns.memory_gb * 1e9, price_per_hour=ns.price,
                          power_watts=ns.power, mfu=ns.mfu)
    except PlanError as e:  # the overrides were checked by their flags: this is the name
        raise PlanError(f"--hardware: {e}") from None
    memory = est.training_memory(shape, batch=ns.batch, seq_len=seq_len, precision=ns.precision,
                                 optimizer=ns.optimizer, checkpointing=ns.checkpointing, lora_rank=ns.lora_rank,
                                 qlora=ns.qlora, zero_stage=ns.zero, devices=ns.devices, cpu=hw.name == "this-cpu")
    cost = est.run_cost(flops, hw.peak_flops, devices=ns.devices, mfu=hw.mfu, price_per_hour=hw.price_per_hour,
                        power_watts=hw.power_watts, pue=ns.pue, grid_kg_per_kwh=ns.grid)
    context = ns.context or seq_len
    result = {
        "model": {"source": source, "params": shape.params, "non_embedding_params": shape.non_embedding,
                  "active_params": cfg.num_params().active,  # what one token uses: FLOPs follow it, memory the total
                  "config": {k: v for k, v in asdict(cfg).items() if v is not None}},
        "tokens": tokens, "tokens_per_param": tokens / shape.params,
        "tokens_per_active_param": tokens / cfg.num_params().active, "seq_len": seq_len,
        "flops": flops, "pf_days": est.pf_days(flops), "flops_per_token": per_token,
        "flops_6nd": 6 * shape.params * tokens,  # the usual headline figure, without the attention term
        "inference_memory": {
            "weights": {p: est.weight_bytes(shape.params, p) for p in ("fp32", "bf16", "int8", "4bit")},
            # an encoder reads its input in one pass and keeps no cache; an encoder-decoder's is the
            # decoder's own keys and values plus the encoder output's, projected once per layer
            "kv_cache": est.kv_cache_bytes(shape, ns.infer_batch, context, "bf16")
            if cfg.causal or getattr(cfg, "encoder_decoder", False) else 0.0,
            "kv_cache_for": {"batch": ns.infer_batch, "context": context, "precision": "bf16"},
        },
        "training_memory": {**asdict(memory), "total": memory.total, "device_memory": hw.memory_bytes,
                            "fits": memory.total <= hw.memory_bytes},
        "hardware": asdict(hw),
        "run": {**asdict(cost), "days": cost.hours / 24, "devices": ns.devices, "mfu": hw.mfu},
    }
    if ns.devices > 1:
        result["parallel"] = _parallel_choice(shape, ns, seq_len, hw)
    if optimal:
        result["compute_optimal"] = {"budget_flops": ns.budget_flops, "law": law, **optimal}
    return result


def _parallel_choice(shape, ns: argparse.Namespace, seq_len: int, hw) -> dict:
    """Which of llmlab's two ways of training on several devices fits: DDP (a whole copy of the
    training state on each) or FSDP2 (parameters, gradients and optimizer states sharded over them,
    ZeRO stage 3), with the setting that picks it; DDP when both fit, being the simpler and faster."""
    per_device = {}
    for name, stage in (("ddp", 0), ("fsdp", 3)):
        memory = est.training_memory(shape, batch=ns.batch, seq_len=seq_len, precision=ns.precision,
                                     optimizer=ns.optimizer, checkpointing=ns.checkpointing, lora_rank=ns.lora_rank,
                                     qlora=ns.qlora, zero_stage=stage, devices=ns.devices,
                                     cpu=hw.name == "this-cpu")
        per_device[name] = memory.total
    fits = [name for name in ("ddp", "fsdp") if per_device[name] <= hw.memory_bytes]
    if ns.qlora:  # a 4-bit base cannot be sharded: QLoRA trains under DDP only
        fits = [name for name in fits if name == "ddp"]
    choice = fits[0] if fits else None
    return {"ddp_bytes": per_device["ddp"], "fsdp_bytes": per_device["fsdp"], "choice": choice,
            "setting": f"system.parallel={choice}" if choice else None}


def _size(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.0f}{unit}" if n >= 1000 * scale else f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def run_plan(ns: argparse.Namespace) -> None:
    from llmlab.common import atomic_write_text, check_output

    if ns.write_config is not None:
        model_file = ns.model if ns.model is not None and Path(ns.model).is_file() else None
        check_output(ns.write_config, label="--write-config", inputs=[model_file], overwrite=ns.overwrite,
                     folder=False)
    elif ns.overwrite:
        raise LlmlabError("--overwrite applies to --write-config only")
    result = plan(ns)
    if ns.write_config:
        import yaml

        atomic_write_text(ns.write_config, yaml.safe_dump({"model": result["model"]["config"]}, sort_keys=False))
    if ns.json:
        print(json.dumps(result, indent=2))
        return
    m, mem, run, hw = result["model"], result["training_memory"], result["run"], result["hardware"]
    c = m["config"]
    layers = f"{c['n_layers']}+{c['n_decoder_layers']}" if "n_decoder_layers" in c else c["n_layers"]
    active = f"{_size(m['active_params'])} active per token, " if m["active_params"] < m["params"] else ""
    print(f"model      {m['source']}: {_size(m['params'])} parameters ({active}{_size(m['non_embedding_params'])} "
          f"non-embedding), {c['family']} dim {c['dim']}, {layers} layers, {c['n_heads']} heads")
    if "compute_optimal" in result:
        opt = result["compute_optimal"]
        print(f"budget     {opt['budget_flops']:.3g} FLOPs, compute-optimal (N params, D tokens):")
        for law in LAWS:
            mark = "  <- used" if law == opt["law"] else ""
            print(f"             {law:17s} N {_size(opt[law]['params']):>7s}  D {_size(opt[law]['tokens']):>7s}{mark}")
    per = f"{result['tokens_per_param']:.1f} per parameter"
    if m["active_params"] < m["params"]:
        per = f"{result['tokens_per_active_param']:.1f} per active parameter, {per}"
    print(f"training   {_size(result['tokens'])} tokens ({per}): "
          f"{result['flops']:.3g} FLOPs = {result['pf_days']:,.1f} petaflop/s-days")
    weights = result["inference_memory"]["weights"]
    kv = result["inference_memory"]["kv_cache_for"]
    print("inference  weights " + ", ".join(f"{p} {_gb(b)}" for p, b in weights.items())
          + f"; KV cache {_gb(result['inference_memory']['kv_cache'])} (batch {kv['batch']}, {kv['context']} tokens)")
    parts = ", ".join(f"{k.replace('_', ' ')} {_gb(mem[k])}" for k in
                      ("weights", "master_weights", "gradients", "optimizer", "activations", "runtime") if mem[k])
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    print(f"memory     {_gb(mem['total'])} per device ({parts}); {verdict} in {_gb(mem['device_memory'])}")
    if "parallel" in result:
        par = result["parallel"]
        advice = (f"use {par['setting']} (torchrun --nproc_per_node {run['devices']})" if par["choice"] else
                  "neither fits: more devices, a smaller --batch, --checkpointing (in training: "
                  "system.gradient_checkpointing=true) or --lora-rank")
        print(f"parallel   DDP needs {_gb(par['ddp_bytes'])} per device, FSDP2 {_gb(par['fsdp_bytes'])}; {advice}")
    print(f"time       {run['days']:,.1f} days on {run['devices']} x {hw['name']} at {run['mfu']:.0%} MFU "
          f"({run['device_hours']:,.0f} device-hours)")
    print(f"cost       ${run['cost']:,.0f} at ${hw['price_per_hour']:.2f}/device-hour; energy "
          f"{run['energy_kwh']:,.0f} kWh, {run['co2_kg'] / 1000:,.1f} t CO2")
    if ns.write_config:
        print(f"config     wrote {ns.write_config}")
