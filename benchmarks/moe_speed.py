"""The MoE layer's forward and backward against transformers' `MixtralSparseMoeBlock`, side by side.

Both get the same weights and the same tokens (8 experts, top-2, 4,096 tokens by default); the
outputs are checked equal first, then each runs forward + backward `--repeats` times, alternating,
and the medians are compared. The ceiling beside them: the same expert matrix products alone
(each expert's even share of the tokens, no routing, no gathering), forward and backward, whose
FLOPs both layers must spend too.

    python benchmarks/moe_speed.py                       # dim 512, expert width 1024, 4,096 tokens
    python benchmarks/moe_speed.py --dim 1024 --hidden 3584 --tokens 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmlab.models.moe import MoEConfig, SparseMoE


def _time(layer, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    layer(x).square().mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024, help="each expert's SwiGLU width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=args.dim, intermediate_size=args.hidden,
                                             num_local_experts=args.experts, num_experts_per_tok=args.top_k))
    for p in hf.parameters():
        p.data.normal_(0, 0.02)
    ours = SparseMoE(args.dim, args.hidden, MoEConfig(n_experts=args.experts, top_k=args.top_k, aux_loss_coef=0.0))
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.gate_up_proj.weight.copy_(hf.experts.gate_up_proj)
        ours.experts.down_proj.weight.copy_(hf.experts.down_proj)
    x = torch.randn(1, args.tokens, args.dim)
    with torch.no_grad():
        gap = (ours(x) - hf(x)).abs().max().item()
    print(f"{args.experts} experts, top-{args.top_k}, {args.tokens:,} tokens, dim {args.dim}, expert width "
          f"{args.hidden}, {torch.get_num_threads()} threads; max |ours - HF| = {gap:.2e}")
    times: dict[str, list[float]] = {"llmlab": [], "transformers": []}
    for name, layer in (("llmlab", ours), ("transformers", hf)):  # one warm-up each
        _time(layer, x)
    for _ in range(args.repeats):
        for name, layer in (("llmlab", ours), ("transformers", hf)):
            layer.zero_grad(set_to_none=True)
            times[name].append(_time(layer, x))
    times["matmuls alone"] = [_ceiling(args) for _ in range(args.repeats)]
    flops = 3 * 2 * args.tokens * args.top_k * 3 * args.dim * args.hidden  # forward + backward, 3 matrices
    ours_s, hf_s = statistics.median(times["llmlab"]), statistics.median(times["transformers"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:13s} forward+backward  median {m * 1e3:8.1f} ms  (min {min(ts) * 1e3:.1f}, max "
              f"{max(ts) * 1e3:.1f})  {flops / m / 1e9:6.1f} GFLOP/s")
    print(f"  transformers / llmlab: {hf_s / ours_s:.2f}x; llmlab / the matmuls alone: "
          f"{ours_s / statistics.median(times['matmuls alone']):.2f}x")


def _ceiling(args) -> float:
    """Forward + backward of the experts' matrix products on an even share of the tokens each."""
    share = args.tokens * args.top_k // args.experts
    xs = [torch.randn(share, args.dim, requires_grad=True) for _ in range(args.experts)]
    gate_up = torch.randn(args.experts, 2 * args.hidden, args.dim, requires_grad=True)
    down = torch.randn(args.experts, args.dim, args.hidden, requires_grad=True)
    t0 = time.perf_counter()
    total = 0
    for e, x in enumerate(xs):
        g, u = torch.nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
        total = total + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down[e]).sum()
    total.backward()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
