"""Accelerators the planner knows: peak throughput, memory, bandwidth and power, from data sheets.

Peaks are dense (no structured sparsity). Anything can be overridden on the command line, and
`this-cpu` is measured on the spot (a fp32 matmul and a memory copy).
"""

from __future__ import annotations

import difflib
import os
import time
from dataclasses import dataclass, replace

from llmlab.plan.estimate import PlanError, check_mfu, non_negative, positive


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense FLOP/s at the training precision (bf16/fp16 tensor cores; fp32 on a CPU)
    memory_bytes: float  # device memory
    bandwidth: float  # memory bandwidth, bytes/s
    power_watts: float  # board power at load (TDP)
    price_per_hour: float  # on-demand cloud price per device-hour in USD, a rough 2024-2025 figure
    source: str = ""
    mfu: float = 0.4  # model FLOPs utilisation assumed when none is given (well-tuned large-model training)


GB = 1e9
GIB = 2**30

CATALOG: dict[str, Hardware] = {h.name: h for h in [
    Hardware("v100-32gb", 125e12, 32 * GIB, 900 * GB, 300, 2.5, "NVIDIA V100 SXM2 data sheet (fp16 tensor core)"),
    Hardware("a100-40gb", 312e12, 40 * GIB, 1555 * GB, 400, 3.0, "NVIDIA A100 SXM4 data sheet (bf16 dense)"),
    Hardware("a100-80gb", 312e12, 80 * GIB, 2039 * GB, 400, 3.5, "NVIDIA A100 SXM4 80GB data sheet (bf16 dense)"),
    Hardware("h100-80gb", 989e12, 80 * GIB, 3350 * GB, 700, 4.5, "NVIDIA H100 SXM5 data sheet (bf16 dense)"),
    Hardware("h200-141gb", 989e12, 141 * GB, 4800 * GB, 700, 5.5, "NVIDIA H200 SXM data sheet (bf16 dense)"),
    Hardware("tpu-v4", 275e12, 32 * GIB, 1200 * GB, 192, 3.2, "Jouppi et al. 2023, TPU v4, Table 1 (bf16)"),
]}


def measure_cpu(seconds: float = 0.5) -> Hardware:
    """This machine: fp32 matmul rate and copy bandwidth measured now, memory from the OS."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.zeros(2**25), torch.zeros(2**25)  # 128 MB each, pages touched before timing
    best_flops = _best_rate(lambda: a @ b, 2 * 1024**3, seconds / 2)
    best_bw = _best_rate(lambda: dst.copy_(src), 2 * src.numel() * 4, seconds / 2)  # read + write
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # small models train at 50-80% of the matmul rate measured this way (benchmarks/plan_accuracy.py)
    return Hardware("this-cpu", best_flops, memory, best_bw, 15.0 * (os.cpu_count() or 1), 0.0,
                    f"measured now: {torch.get_num_threads()} threads, fp32", mfu=0.7)


def _best_rate(work, amount: float, seconds: float, min_runs: int = 3) -> float:
    """The best amount / second of `work` over at least `min_runs` runs and about `seconds`."""
    best, runs, deadline = 0.0, 0, time.perf_counter() + seconds
    while runs < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        work()
        best = max(best, amount / (time.perf_counter() - t0))
        runs += 1
    return best


# override -> its check: what a device can be (PlanError naming the field otherwise)
_CHECKS = {"peak_flops": positive, "memory_bytes": positive, "bandwidth": positive, "power_watts": non_negative,
           "price_per_hour": non_negative, "mfu": check_mfu}


def get_hardware(name: str, **overrides) -> Hardware:
    """A catalog entry (or "this-cpu", measured), with fields replaced by the non-None `overrides`.

    Raises:
        PlanError: an unknown name, an unknown field, or an override out of range (a peak, memory or
            bandwidth <= 0, a negative price or power, an mfu outside (0, 1]).
    """
    known = [*CATALOG, "this-cpu"]
    key = name.lower() if isinstance(name, str) else name
    if key not in known:
        close = difflib.get_close_matches(str(key), known, n=1)
        raise PlanError(f"unknown hardware {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                        f"known: {', '.join(known)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    for field, value in given.items():
        if field not in _CHECKS:
            raise PlanError(f"unknown hardware field {field!r}; known: {', '.join(_CHECKS)}")
        _CHECKS[field](field, value)
    return replace(measure_cpu() if key == "this-cpu" else CATALOG[key], **given)
