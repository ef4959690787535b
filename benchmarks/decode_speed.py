"""Decode speed: llmlab's `Engine.generate` against HF `generate()` on identical configs, side by side.

Each config is built twice with the same random weights: an llmlab model and the HF *ForCausalLM
that `llmlab convert` would write for it. Both decode greedily in fp32 (`--dtype bf16` for GPUs)
from the same random prompt (`--prompt-len` tokens, batch 1) for exactly `--new-tokens` tokens:
llmlab has no stop tokens by default and HF is given no EOS. Tokens/s counts the new tokens over
the whole generate call, prefill included; after one warm-up call each, calls alternate between
the two so that noise on a shared machine hits both alike, and the median over `--repeats` is
reported. The greedy outputs are compared: the run fails if the first tokens differ (the weights
did not map) and otherwise reports how many leading tokens agree (fp32 near-ties may diverge later).

Compiled: a third side decodes with `Engine(model, compile=True)` (`--no-compile` skips it). Its
warm-up call includes the compilation, whose time is printed; the timed calls replay the compiled step.
The ratio targets are judged on the faster of llmlab's two modes, and both are printed.

Roofline: decoding one token reads every weight once, so tokens/s can be at most bandwidth / weight
bytes. Weight bytes count each parameter once at its dtype's size (a tied embedding once, as the
lm_head reads all of it); an untied embed_tokens is excluded, as its lookup reads one row. The KV
cache, activations and the rotary tables are not counted (the cache is ~1% of the weights on 185m).
Bandwidth is the `dst.copy_(src)` rate over 256 MB fp32 tensors, bytes read plus written (best of
three copies), measured just before and just after every timed call: each call is set against
the mean of its two, since a shared machine's bandwidth moves from minute to minute, and the
share of the roofline is the median over the calls. The share against the best copy rate seen in
the whole run is printed beside it (`--bandwidth` replaces both with a given figure).

Batch: on `--batch-config`, llmlab (and HF, for reference) decode `--batch` different prompts of
equal length at once; throughput is batch * new tokens / time, against the batch-1 figure.

    python benchmarks/decode_speed.py                          # 1m, 14m, 185m and batch 16 on 14m
    python benchmarks/decode_speed.py --configs 1m --repeats 1
    python benchmarks/decode_speed.py --configs 185m --device cuda --bandwidth 3350

Targets on 2 CPU cores: >= 4x HF on 1m, >= 3x HF on 14m, >= 85% of the roofline on 185m, and
batch-16 throughput >= 6x batch-1 on 14m.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmlab.generate import Engine, SamplingParams
from llmlab.models import LlamaConfig, build_model
from llmlab.models.convert import config_to_hf, llmlab_to_hf_state

# name -> (model config, HF repeats cap: its 185m calls take seconds each)
CONFIGS = {
    "1m": (LlamaConfig(vocab_size=4096, dim=128, n_layers=4, n_heads=4, hidden_dim=384, max_seq_len=512,
                       tie_embeddings=True), None),
    "14m": (LlamaConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=512, tie_embeddings=True),
            None),
    "185m": (LlamaConfig(vocab_size=32000, dim=1024, n_layers=12, n_heads=16, max_seq_len=512,
                         tie_embeddings=True), 2),
}
# (what, config, key, threshold): key is "best_ratio", "of_roofline" (both of the faster llmlab mode) or
# "batch_gain" (eager)
TARGETS = [("llmlab / HF tokens/s", "1m", "best_ratio", 4.0),
           ("llmlab / HF tokens/s", "14m", "best_ratio", 3.0),
           ("llmlab share of roofline", "185m", "of_roofline", 0.85),
           ("llmlab batch-{batch} / batch-1 tokens/s", "14m", "batch_gain", 6.0)]


def hf_peer(model):
    """The HF model holding exactly the weights of `model`, set to decode without EOS."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = config_to_hf(model.config)
    hf_config = transformers.AutoConfig.for_model(**cfg)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=model.embed_tokens.weight.dtype)
    state = llmlab_to_hf_state(model.state_dict(), model.config.family)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    hf.generation_config = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                                         bos_token_id=None)
    return hf.to(model.embed_tokens.weight.device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CopyMeter:
    """Bytes/s of `dst.copy_(src)` on fp32 tensors of `mbytes` MB, counting read + write: the best
    of `repeats` copies each time it is called, and `best`, the highest rate it has seen."""

    def __init__(self, device: torch.device, mbytes: int = 256):
        n = mbytes * 2**20 // 4
        self.device = device
        self.src, self.dst = torch.rand(n, device=device), torch.empty(n, device=device)
        self.dst.copy_(self.src)  # fault the pages in
        self.best = 0.0

    def __call__(self, repeats: int = 3) -> float:
        fastest = float("inf")
        for _ in range(repeats):
            sync(self.device)
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            sync(self.device)
            fastest = min(fastest, time.perf_counter() - t0)
        rate = 2 * self.src.numel() * 4 / fastest
        self.best = max(self.best, rate)
        return rate


def weight_bytes(model) -> int:
    """Bytes of weights read per decoded token: every parameter once, less an untied embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips tied copies
    emb = model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        total -= emb.numel() * emb.element_size()
    return total


class Decoder:
    """Timed greedy generation of exactly `new_tokens` tokens per prompt on one side; with a `bandwidth`
    meter, each timed call also records the mean copy bandwidth measured just before and after it."""

    def __init__(self, name: str, generate, device: torch.device, bandwidth: CopyMeter | None):
        self.name, self.generate, self.device, self.bandwidth = name, generate, device, bandwidth
        self.times: list[float] = []
        self.bandwidths: list[float] = []

    def run(self, prompts: list[list[int]], record: bool) -> list[list[int]]:
        before = self.bandwidth() if record and self.bandwidth else None
        sync(self.device)
        t0 = time.perf_counter()
        out = self.generate(prompts)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)
            if before is not None:
                self.bandwidths.append((before + self.bandwidth()) / 2)
        return out


def decoders(ours, peer, new_tokens: int, device: torch.device, compile: bool,
             bandwidth: CopyMeter | None) -> list[Decoder]:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)

    def engine_generate(engine):
        return lambda prompts: [c.token_ids for c in engine.generate(prompts, params)]

    @torch.inference_mode()
    def peer_generate(prompts):
        ids = torch.tensor(prompts, device=device)
        out = peer.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    sides = [Decoder("llmlab", engine_generate(Engine(ours)), device, bandwidth)]
    if compile:
        sides.append(Decoder("compiled", engine_generate(Engine(ours, compile=True)), device, bandwidth))
    return sides + [Decoder("hf", peer_generate, device, bandwidth)]


def agreement(a: list[list[int]], b: list[list[int]], new_tokens: int) -> int:
    """Leading tokens on which both sides agree in every row; fails if a side fell short or the
    very first tokens differ."""
    for rows in (a, b):
        if any(len(r) != new_tokens for r in rows):
            raise RuntimeError(f"expected {new_tokens} new tokens, got {[len(r) for r in rows]}")
    agree = min(next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), new_tokens) for r, s in zip(a, b))
    if agree == 0:
        raise RuntimeError(f"first greedy tokens differ: llmlab {[r[:8] for r in a]} vs hf {[r[:8] for r in b]}")
    return agree


def measure(sides: list[Decoder], prompts: list[list[int]], repeats: int, hf_repeats: int,
            new_tokens: int) -> dict:
    """Warm up each side (the compiled side compiles then), then alternate timed calls; tokens/s is
    the median."""
    outputs, result = {}, {}
    for d in sides:
        t0 = time.perf_counter()
        outputs[d.name] = d.run(prompts, record=False)
        result[f"{d.name}_warmup_s"] = time.perf_counter() - t0
    for i in range(repeats):
        for d in (sides if i % 2 == 0 else sides[::-1]):
            if d.name != "hf" or i < hf_repeats:
                d.run(prompts, record=True)
    tokens = len(prompts) * new_tokens
    result.update({d.name: tokens / statistics.median(d.times) for d in sides})
    if "compiled" in outputs and outputs["compiled"] != outputs["llmlab"]:
        raise RuntimeError("compiled and eager greedy outputs differ")
    if "hf" in outputs:
        result["agree"] = agreement(outputs["llmlab"], outputs["hf"], new_tokens)
        result["ratio"] = result["llmlab"] / result["hf"]
        if "compiled" in result:
            result["ratio_compiled"] = result["compiled"] / result["hf"]
    return result


def paired(sides: list[Decoder], tokens: int, weight_bytes: int) -> dict:
    """Per side: the median over its timed calls of tokens/s over that call's roofline, and the
    median bandwidth of those calls."""
    out = {}
    for d in sides:
        if d.bandwidths:
            out[f"{d.name}_share"] = statistics.median(
                tokens / t / (bw / weight_bytes) for t, bw in zip(d.times, d.bandwidths))
            out[f"{d.name}_bandwidth"] = statistics.median(d.bandwidths)
    return out


def bench(name: str, args, meter: CopyMeter | None) -> dict:
    cfg, hf_cap = CONFIGS[name]
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"prompt + new tokens exceed {name}'s context of {cfg.max_seq_len}")
    torch.manual_seed(0)
    ours = build_model(cfg).to(device=device, dtype=dtype).eval()
    peer = hf_peer(ours)
    sides = decoders(ours, peer, args.new_tokens, device, compile=args.compile, bandwidth=meter)
    hf_repeats = min(args.repeats, hf_cap or args.repeats)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=gen).tolist()
    result = {"config": name, "params": sum(p.numel() for p in ours.parameters()), **measure(
        sides, prompt, args.repeats, hf_repeats, args.new_tokens)}
    result["weight_bytes"] = weight_bytes(ours)
    result.update(paired(sides, args.new_tokens, result["weight_bytes"]))
    result["bandwidths"] = [bw for d in sides for bw in d.bandwidths]
    if name == args.batch_config and args.batch > 1:
        prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=gen).tolist()
        sides = [d for d in sides if d.name != "compiled"]  # the gain is eager batch over eager batch 1
        for d in sides:
            d.times.clear()
            d.bandwidths.clear()
        batch = result["batch"] = measure(sides[:1] if args.no_hf_batch else sides, prompts, args.repeats,
                                          hf_repeats, args.new_tokens)
        result["batch_gain"] = batch["llmlab"] / result["llmlab"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported); "
                                                               "HF on 185m makes at most 2")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--prompt-len", type=int, default=16, help="random prompt tokens")
    parser.add_argument("--batch", type=int, default=16, help="prompts decoded together on --batch-config; 1 = skip")
    parser.add_argument("--batch-config", default="14m", choices=list(CONFIGS))
    parser.add_argument("--no-hf-batch", action="store_true", help="time only llmlab at --batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of both models")
    parser.add_argument("--bandwidth", type=float, help="GB/s to report against instead of measuring one")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled side (it compiles for about a minute per config)")
    args = parser.parse_args()

    device = torch.device(args.device)
    meter = None if args.bandwidth else CopyMeter(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}, "
          f"greedy, prompt {args.prompt_len} + {args.new_tokens} new tokens, prefill included")
    print(f"{'config':>6} {'params':>8} {'llmlab tok/s':>13} {'compiled':>9} {'hf tok/s':>9} {'ratio':>6} "
          f"{'compiled':>8} {'compile s':>9} {'agree':>6} {'roofline':>9} {'of roofline':>11} {'of best':>8}")
    results = {}
    for name in args.configs:
        r = results[name] = bench(name, args, meter)
        r["mode"] = "compiled" if r.get("compiled", 0) > r["llmlab"] else "llmlab"
        r["best_ratio"] = r[r["mode"]] / r["hf"]
        if meter:  # each call against the bandwidth around it; and against the best copy of the run so far
            r["roofline"] = r[f"{r['mode']}_bandwidth"] / r["weight_bytes"]
            r["of_roofline"] = r[f"{r['mode']}_share"]
            r["of_best"] = r[r["mode"]] / (meter.best / r["weight_bytes"])
        else:
            r["roofline"] = args.bandwidth * 1e9 / r["weight_bytes"]
            r["of_roofline"] = r["of_best"] = r[r["mode"]] / r["roofline"]
        compiled = (f"{r['compiled']:>9,.1f}", f"{r['ratio_compiled']:>7.2f}x", f"{r['compiled_warmup_s']:>9.0f}") \
            if "compiled" in r else (f"{'-':>9}", f"{'-':>8}", f"{'-':>9}")
        print(f"{name:>6} {r['params'] / 1e6:>7.1f}M {r['llmlab']:>13,.1f} {compiled[0]} {r['hf']:>9,.1f} "
              f"{r['ratio']:>5.2f}x {compiled[1]} {compiled[2]} {r['agree']:>6} {r['roofline']:>9,.1f} "
              f"{r['of_roofline']:>11.1%} {r['of_best']:>8.1%}", flush=True)
    if meter:
        seen = [bw for r in results.values() for bw in r["bandwidths"]]
        print(f"bandwidth (256 MB fp32 copy, read + write) around the timed calls {min(seen) / 1e9:.1f}-"
              f"{max(seen) / 1e9:.1f} GB/s, best {meter.best / 1e9:.1f}; roofline: at the median of the "
              "faster llmlab mode's calls")
    else:
        print(f"bandwidth {args.bandwidth:.1f} GB/s (given)")
    for name, r in results.items():
        if "batch" in r:
            b = r["batch"]
            hf = (f", hf {b['hf']:,.1f} tok/s ({b['hf'] / r['hf']:.1f}x its batch 1; llmlab {b['ratio']:.2f}x hf, "
                  f"agree {b['agree']})") if "hf" in b else ""
            print(f"batch {args.batch} on {name}: llmlab {b['llmlab']:,.1f} tok/s = {r['batch_gain']:.1f}x batch 1{hf}")
    print("targets:")
    for what, name, key, threshold in TARGETS:
        if name not in results or key not in results[name]:
            continue
        value = results[name][key]
        shown = f"{value:.1%} >= {threshold:.0%}" if key == "of_roofline" else f"{value:.2f}x >= {threshold:g}x"
        mode = {"compiled": " (compiled)", "llmlab": " (eager)"}[results[name]["mode"]] \
            if key in ("best_ratio", "of_roofline") else ""
        print(f"  {name:>5} {what.format(batch=args.batch)}{mode}: {shown}  "
              f"{'met' if value >= threshold else 'NOT MET'}")


if __name__ == "__main__":
    main()
