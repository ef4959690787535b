"""Peak memory of full fine-tuning, LoRA and QLoRA of the same ~110M-parameter LLaMA, side by side.

The base is written once as an llmlab checkpoint; each method then runs in a fresh subprocess
the way `llmlab finetune` sets it up: the base loaded (4-bit NF4 with double quantization, one
tensor at a time, for QLoRA), LoRA r=16 on the attention projections q and v (the LoRA paper's
choice) or the whole model trainable, fp32 AdamW, and a few steps of batch 4 x 256 tokens, once
without and once with gradient checkpointing (which QLoRA's recipe uses), the same in every
method. The peak is the process's peak resident set size on CPU (ru_maxrss, which includes the
interpreter and torch; importing bitsandbytes adds about 120 MB to QLoRA's) and torch's peak
allocated memory on a GPU. Memory released by glibc stays in its free lists, so large blocks are
mapped and unmapped directly (MALLOC_MMAP_THRESHOLD_=1 MiB) to make the resident size follow the
live tensors.

    python benchmarks/finetune_memory.py
    python benchmarks/finetune_memory.py --device cuda --steps 5

Targets: QLoRA peak <= 0.4x full fine-tuning; LoRA trains < 1% of the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = dict(vocab_size=16000, dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=256)

CHILD = r"""
import json, resource, sys, time
import torch
from llmlab.models.io import load_model
from llmlab.peft import LoraConfig, apply_lora, trainable_parameters
from llmlab.train.config import OptimConfig
from llmlab.train.optim import build_optimizer

method, base, device, steps, batch, seq_len, checkpointing = json.loads(sys.argv[1])
device = torch.device(device)
if method == "qlora":
    from llmlab.quant import load_quantized
    model = load_quantized(base, device)
else:
    model = load_model(base, device)
    model.requires_grad_(True)
if method != "full":
    apply_lora(model, LoraConfig(r=16, alpha=32, targets=["q_proj", "v_proj"]))
model.train()
model.gradient_checkpointing = checkpointing
opt = build_optimizer(model, OptimConfig(), device)
x = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    loss = model(x, targets=x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
trained, total = trainable_parameters(model)
peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "trained": trained, "total": total, "step_s": min(times), "loss": loss.item()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="gradient checkpointing in every method (QLoRA's recipe uses it)")
    args = parser.parse_args()

    import torch

    from llmlab.models import LlamaConfig, build_model
    from llmlab.models.io import save_model

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_model(build_model(LlamaConfig(**MODEL)), Path(tmp) / "base")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "PYTHONWARNINGS": "ignore"}
        for checkpointing in {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]:
            results = {}
            for method in ("full", "lora", "qlora"):
                spec = json.dumps([method, str(Path(tmp) / "base"), args.device, args.steps, args.batch,
                                   args.seq_len, checkpointing])
                out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"{method} failed:\n{out.stderr}")
                results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            report(results, args, checkpointing)


def report(results: dict, args: argparse.Namespace, checkpointing: bool) -> None:
    total = results["full"]["total"]
    unit = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\nLLaMA {total / 1e6:.1f}M parameters (dim {MODEL['dim']}, {MODEL['n_layers']} layers, vocab "
          f"{MODEL['vocab_size']}), batch {args.batch} x {args.seq_len} tokens, fp32 AdamW, {args.device}, "
          f"gradient checkpointing {'on' if checkpointing else 'off'}")
    print(f"{'method':8s} {unit:>14s} {'vs full':>8s} {'trainable':>12s} {'share':>7s} {'step s':>7s}")
    for method, r in results.items():
        print(f"{method:8s} {r['peak'] / 2**20:11.0f} MiB {r['peak'] / results['full']['peak']:7.2f}x "
              f"{r['trained']:12,d} {100 * r['trained'] / total:6.2f}% {r['step_s']:7.2f}")
    ratio = results["qlora"]["peak"] / results["full"]["peak"]
    share = results["lora"]["trained"] / total
    print(f"QLoRA / full peak: {ratio:.2f}x (target <= 0.4x: {'met' if ratio <= 0.4 else 'NOT MET'}); "
          f"LoRA trains {100 * share:.2f}% of the parameters (target < 1%: {'met' if share < 0.01 else 'NOT MET'})")


if __name__ == "__main__":
    main()
