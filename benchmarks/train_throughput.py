"""Training throughput: llmlab against HF transformers on identical configs, side by side.

Each config is built twice with the same weights: an llmlab model and the HF *ForCausalLM
that `llmlab convert` would write for it. Both minimise the mean next-token cross-entropy (each
its fastest way: llmlab's blockwise loss, F.cross_entropy on HF's logits) with the same fused
AdamW and clipping, on the same random token batches; steps alternate
between the two so that noise on a shared machine hits both alike. Prints tokens/s for both,
the ratio, and the achieved model GFLOP/s (6N + 12 L d T per token) against the fp32 matmul
ceiling: the best 2048^3 matmul rate in the dtype trained in (fp32, or bf16 with --dtype bf16), measured
in the same run, before and after each config
(or `--ceiling`). On a GPU it reports model FLOPs utilisation against the bf16 peak instead.

The bounds: llmlab's step has its matrix products (forward and backward, at their exact shapes and
layouts) captured once and replayed alone, alternating with the two steps. A step that spent no time
on anything else (attention, norms, activations, the loss's softmax, the optimizer) would reach that
share of the ceiling, and that ratio to HF: the most the BLAS allows on this machine.

    python benchmarks/train_throughput.py                       # both CPU configs, fp32
    python benchmarks/train_throughput.py --configs 14m --steps 20
    python benchmarks/train_throughput.py --configs gpt2-124m --device cuda --dtype bf16 --compile

Targets on 2 CPU cores: ratio >= 1.5 on 1m, >= 1.1 on 14m, and >= 85% of the ceiling on 14m.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmlab.models import LlamaConfig, build_model
from llmlab.models.convert import config_to_hf, llmlab_to_hf_state
from llmlab.models.presets import get_preset

# name -> (model config, seq_len, batch_size)
CONFIGS = {
    # the SwiGLU width of 3 d (not the default 8/3 d rounded up to 512) makes this the 1.4M-parameter model
    # the targets name, as in decode_speed.py
    "1m": (LlamaConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, hidden_dim=384, max_seq_len=128,
                       tie_embeddings=True), 128, 16),
    "14m": (LlamaConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=256, tie_embeddings=True),
            256, 8),
}
# dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets (SXM parts)
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def hf_peer(model, dtype: torch.dtype):
    """The HF model holding exactly the weights of `model`."""
    import transformers

    cfg = config_to_hf(model.config)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    state = llmlab_to_hf_state(model.state_dict(), model.config.family)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return hf.to(model.embed_tokens.weight.device)


class Trainer:
    """One optimizer step of `loss(inputs, targets)` on `model`'s parameters."""

    def __init__(self, name: str, model, loss, autocast_dtype: torch.dtype | None):
        self.name, self.model, self.loss = name, model, loss
        self.autocast_dtype = autocast_dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> float:
        sync(x.device)
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        sync(x.device)
        if record:
            self.times.append(time.perf_counter() - t0)
        return value


class MatmulReplay(TorchDispatchMode):
    """Records the matrix products run under it (op, shapes, strides, dtypes); `replay()` then runs
    the same products again, in order, on stand-in operands of the same layouts."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
           torch.ops.aten.addmm_.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.times: list[float] = []
        self._operands: dict[tuple, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            self.calls.append((func, tuple(self._spec(a) for a in args),
                               {k: self._spec(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)

    @staticmethod
    def _spec(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
        return value

    def _operand(self, spec):
        if not (isinstance(spec, tuple) and spec and spec[0] == "tensor"):
            return spec
        if spec not in self._operands:  # one stand-in per layout, filled so that no product sees NaNs
            _, shape, stride, dtype, device = spec
            span = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
            flat = torch.empty(span, dtype=dtype, device=device).uniform_(-1, 1)
            self._operands[spec] = flat.as_strided(shape, stride)
        return self._operands[spec]

    def replay(self, device: torch.device, record: bool) -> None:
        calls = [(f, [self._operand(a) for a in args], {k: self._operand(v) for k, v in kw.items()})
                 for f, args, kw in self.calls]
        sync(device)
        t0 = time.perf_counter()
        for f, args, kw in calls:
            f(*args, **kw)
        sync(device)
        if record:
            self.times.append(time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best-of FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bench(name: str, args) -> dict:
    if name in CONFIGS:
        cfg, seq_len, batch = CONFIGS[name]
    else:
        cfg, seq_len, batch = get_preset(name), args.seq_len, args.batch_size
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_model(cfg).to(device)
    peer = hf_peer(ours, torch.float32)
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    ours_fwd = torch.compile(ours) if args.compile else ours
    peer_fwd = torch.compile(peer) if args.compile else peer
    trainers = [  # each side's fastest way to the mean next-token loss
        Trainer("llmlab", ours, lambda x, y: ours_fwd(x, targets=y), autocast),
        Trainer("hf", peer, lambda x, y: F.cross_entropy(peer_fwd(input_ids=x).logits.float().flatten(0, 1),
                                                         y.flatten()), autocast)]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
               for _ in range(4)]
    products = MatmulReplay()
    with products, torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        ours(batches[0][:, :-1], targets=batches[0][:, 1:]).backward()
    ours.zero_grad(set_to_none=True)
    first = {}
    for i in range(args.warmup + args.steps):
        rows, record = batches[i % len(batches)], i >= args.warmup
        for t in (trainers if i % 2 == 0 else trainers[::-1]):
            loss = t.step(rows[:, :-1], rows[:, 1:], record=record)
            first.setdefault(t.name, loss)
        products.replay(device, record)
    if abs(first["llmlab"] - first["hf"]) > 1e-3 * max(1.0, abs(first["hf"])):
        raise RuntimeError(f"first-step losses differ: llmlab {first['llmlab']:.6f} vs hf {first['hf']:.6f}")
    tokens = batch * seq_len
    flops = cfg.flops_per_token(seq_len) * tokens
    result = {"config": name, "params": cfg.num_params().total, "tokens_per_step": tokens}
    for t in trainers:
        step_s = statistics.median(t.times)
        result[t.name] = {"step_s": step_s, "tokens_per_s": tokens / step_s, "flops_per_s": flops / step_s}
    result["ratio"] = result["llmlab"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    products_s = statistics.median(products.times)
    result["products_alone"] = {"step_s": products_s, "flops_per_s": flops / products_s,
                                "ratio": result["hf"]["step_s"] / products_s}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="1m,14m", help="comma-separated: 1m, 14m or any preset name")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (GPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--seq-len", type=int, default=1024, help="for preset configs")
    parser.add_argument("--batch-size", type=int, default=8, help="for preset configs")
    parser.add_argument("--ceiling", type=float, help="FLOP/s to report against instead of measuring one")
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        gpu_name = torch.cuda.get_device_name(device)
        ceiling = next((v for k, v in GPU_PEAKS.items() if k in gpu_name), None)
        ceiling_label = f"{gpu_name} bf16 peak"
        if ceiling is None:
            ceiling = matmul_ceiling(device, torch.bfloat16, n=8192)
            ceiling_label = "measured bf16 matmul"
    else:  # shared machines drift: the best rate seen before or after any config counts
        run_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32  # the ceiling of the dtype trained in
        ceiling = matmul_ceiling(device, run_dtype)
        ceiling_label = f"best {args.dtype} 2048^3 matmul seen in this run"
    if args.ceiling:
        ceiling, ceiling_label = args.ceiling, "given"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}"
          f"{', compiled' if args.compile else ''}; ceiling: {ceiling_label}")
    share = "MFU" if gpu else "of ceiling"
    print(f"{'config':>10} {'params':>8} {'llmlab tok/s':>13} {'hf tok/s':>10} {'ratio':>6} "
          f"{'GFLOP/s':>8} {'ceiling':>8} {share:>10} | products alone: {'ratio':>6} {share:>10}")
    for name in args.configs.split(","):
        r = bench(name.strip(), args)
        if not (gpu or args.ceiling):
            ceiling = max(ceiling, matmul_ceiling(device, run_dtype))
        print(f"{r['config']:>10} {r['params'] / 1e6:>7.1f}M {r['llmlab']['tokens_per_s']:>13,.0f} "
              f"{r['hf']['tokens_per_s']:>10,.0f} {r['ratio']:>5.2f}x {r['llmlab']['flops_per_s'] / 1e9:>8,.1f} "
              f"{ceiling / 1e9:>8,.0f} {r['llmlab']['flops_per_s'] / ceiling:>10.1%} | {'':>15} "
              f"{r['products_alone']['ratio']:>5.2f}x {r['products_alone']['flops_per_s'] / ceiling:>10.1%}",
              flush=True)


if __name__ == "__main__":
    main()
