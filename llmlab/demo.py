"""`llmlab demo`: the main job on the embedded default, end to end, with no arguments.

Builds a model from a preset, writes it as an llmlab checkpoint and as an HF-format folder,
loads both back and checks that they give the same logits, then prints the model zoo: every
published preset with the parameter count computed from its config next to the published one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.common import LlmlabError, seed_everything, style
from llmlab.config import save_config
from llmlab.models import build_model
from llmlab.models.io import load_model, save_hf, save_model
from llmlab.models.presets import PRESETS, get_preset


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"  # run directory: config.yaml and the checkpoints
    preset: str = "llama-1m"  # model preset to build
    seq_len: int = 64  # tokens in the parity check
    seed: int = 0


def run(cfg: DemoConfig) -> dict:
    """Run the demo; returns {"params": ..., "max_abs_diff": {"llmlab": ..., "hf": ...}}."""
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    try:
        model_cfg = get_preset(cfg.preset)
    except KeyError as e:
        raise LlmlabError(e.args[0]) from None
    save_config(cfg, out / "config.yaml")
    model = build_model(model_cfg).eval()
    count = model.num_params()
    print(style(f"model {cfg.preset} ({model_cfg.family})", "1"))
    print(f"  parameters      {count.total:,} total, {count.non_embedding:,} non-embedding")
    print(f"  training FLOPs  {model.flops_per_token(cfg.seq_len):,} per token at T={cfg.seq_len}")

    save_model(model, out / "checkpoint")
    save_hf(model, out / "hf")
    x = torch.randint(0, model_cfg.vocab_size, (2, cfg.seq_len))
    diffs = {}
    with torch.no_grad():
        ref = model(x)
        for kind in ("checkpoint", "hf"):
            diffs[kind] = (load_model(out / kind)(x) - ref).abs().max().item()
            print(f"  reload {kind:10s} max |logit diff| = {diffs[kind]:.2e}  ({out / kind})")
    if max(diffs.values()) > 1e-5:
        raise LlmlabError(f"round trip changed the logits: {diffs}")

    print(style("\nthe published zoo (parameters computed from each config)", "1"))
    print(f"  {'preset':16s} {'family':6s} {'computed':>12s} {'published':>12s} {'diff':>7s}")
    for name, preset in PRESETS.items():
        if preset.published_params is None:
            continue
        total = get_preset(name).num_params().total
        print(f"  {name:16s} {preset.family:6s} {_human(total):>12s} {_human(preset.published_params):>12s} "
              f"{100 * (total / preset.published_params - 1):+6.1f}%")
    return {"params": count.total, "max_abs_diff": diffs}


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
