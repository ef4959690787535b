"""The planner's predictions against measurement: peak memory and step time of pretraining on this CPU.

Each config trains in a fresh subprocess (fp32, fused AdamW, clipping, the blockwise loss: the
step `llmlab pretrain` takes) for a few steps, reporting its peak resident set size and its median
step time. It runs twice: with glibc's default allocator, whose free lists keep memory that the
process has released (so the resident size grows above the live tensors from step to step), and
with large blocks always mapped and unmapped (MALLOC_MMAP_THRESHOLD_=1 MiB), where the resident
size follows the live tensors, at the price of slower steps. The prediction is what `pretrain`'s
preflight computes on top of the process's resident size before the model is built (the
interpreter and torch): weights, gradients, AdamW states, activations and the loss block, torch's
kernels paged in by the first step, and the share of freed activation memory glibc keeps. The
live-memory column compares the prediction without that last share. Step time is predicted as the
training FLOPs over this CPU's matmul rate measured just before, at the planner's assumed utilisation.

    python benchmarks/plan_accuracy.py
    python benchmarks/plan_accuracy.py --configs 14m --steps 8

Targets: peak memory within 25% of the measured peak RSS, step time within 30%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {  # name -> (model fields, batch, seq_len)
    "1m": (dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, hidden_dim=384, max_seq_len=256), 16, 128),
    "14m": (dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=256, tie_embeddings=True), 8, 256),
    "60m": (dict(vocab_size=16384, dim=640, n_layers=10, n_heads=10, max_seq_len=512), 8, 512),
}

CHILD = r"""
import json, resource, statistics, sys, time
from pathlib import Path
import torch
from llmlab.models import LlamaConfig, build_model
from llmlab.train.config import OptimConfig
from llmlab.train.optim import build_optimizer

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

fields, batch, seq_len, steps = json.loads(sys.argv[1])
baseline = rss()
torch.manual_seed(0)
model = build_model(LlamaConfig(**fields))
opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
x = torch.randint(0, fields["vocab_size"], (batch, seq_len))
times = []
for i in range(steps + 2):
    t0 = time.perf_counter()
    loss = model(x, targets=x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 2:
        times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": baseline, "peak": peak, "step_s": statistics.median(times)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    args = parser.parse_args()

    import torch

    from llmlab.models import LlamaConfig
    from llmlab.plan.estimate import CPU_ALLOCATOR_RETENTION
    from llmlab.plan.hardware import measure_cpu
    from llmlab.train.pretrain import PretrainConfig, estimate_training_memory

    # as a user would: the planner measures this CPU (`this-cpu`), then the run trains right after
    runs = []
    for name in args.configs:
        fields, batch, seq_len = CONFIGS[name]
        cpu = measure_cpu()
        payload = json.dumps([fields, batch, seq_len, args.steps])
        runs.append((name, cpu, _child(payload, {}), _child(payload, {"MALLOC_MMAP_THRESHOLD_": str(2**20)})))
    print(f"this CPU: matmul rate measured before each config, assumed utilisation {cpu.mfu:.0%}")
    print(f"{'config':>6s} {'params':>8s} {'pred MB':>8s} {'RSS MB':>7s} {'err':>5s} {'live MB':>8s} {'err':>5s} "
          f"{'GFLOP/s':>8s} {'pred step s':>12s} {'step s':>7s} {'err':>5s}")
    worst_mem = worst_live = worst_time = 0.0
    for name, cpu, default, live in runs:
        fields, batch, seq_len = CONFIGS[name]
        cfg = PretrainConfig(model=LlamaConfig(**fields), batch_size=batch, seq_len=seq_len)
        memory = estimate_training_memory(cfg, torch.device("cpu"))
        estimate, kept = memory.total, CPU_ALLOCATOR_RETENTION * memory.activations
        predicted_s = cfg.model.flops_per_token(seq_len) * batch * seq_len / (cpu.peak_flops * cpu.mfu)
        mem_err = (default["baseline"] + estimate) / default["peak"] - 1
        live_err = (live["baseline"] + estimate - kept) / live["peak"] - 1
        time_err = predicted_s / default["step_s"] - 1
        worst_mem, worst_live = max(worst_mem, abs(mem_err)), max(worst_live, abs(live_err))
        worst_time = max(worst_time, abs(time_err))
        print(f"{name:>6s} {cfg.model.num_params().total / 1e6:7.1f}M {(default['baseline'] + estimate) / 2**20:8.0f} "
              f"{default['peak'] / 2**20:7.0f} {mem_err:+5.0%} {live['peak'] / 2**20:8.0f} {live_err:+5.0%} "
              f"{cpu.peak_flops / 1e9:8.0f} {predicted_s:12.3f} {default['step_s']:7.3f} {time_err:+5.0%}")
    verdict = lambda worst, limit: f"worst {worst:.0%} {'met' if worst <= limit else 'NOT MET'}"  # noqa: E731
    print(f"targets: memory within 25% of peak RSS: {verdict(worst_mem, 0.25)} (live memory: {worst_live:.0%}); "
          f"step time within 30%: {verdict(worst_time, 0.30)}")


def _child(payload: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
