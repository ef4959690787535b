"""Alignment speed and memory: llmlab's DPO and GRPO steps beside TRL's trainers, PPO's rollouts, DPO's memory.

One tiny LLaMA (random weights, a BPE tokenizer trained on the synthetic tasks) is written as an
llmlab checkpoint and exported to HF format for TRL. Both sides train it with LoRA (r 16 on every
linear layer, fp32 AdamW) on the same synthetic data (`llmlab data synth format=preference|prompt`),
prompts rendered by llmlab's chat template (TRL gets the rendered text):

- DPO: `llmlab align method=dpo` (reference from the base with adapters disabled, computed once per
  pair before the first step: dpo.reference=precompute, or at every step: adapters) against
  `trl.DPOTrainer` with the same LoRA (its reference: adapters disabled at every step), batch
  `--pairs` pairs; the time of one optimizer step, median over the steps after the first.
- GRPO, rollouts included: `llmlab align method=grpo` (its generation engine: batched, KV cache)
  against `trl.GRPOTrainer` (transformers' generate on CPU), `--prompts` prompts x `--group` answers
  of exactly `--new-tokens` tokens (a random model rarely ends its turn), beta 0.04 (a reference
  forward through disabled adapters), one optimisation pass.
- PPO: the rollout tokens/s of `llmlab align method=ppo` (sampled answers per second of rollout),
  beside transformers' `generate` sampling the same batch of prompts with a KV cache through the
  same LoRA adapters (peft, unmerged; both decode through the adapters).
- Memory: `llmlab align method=dpo peft=lora` against `llmlab finetune peft=lora` of one larger model
  (`--memory-dim`, 12 layers) on the same sequences: the DPO batch of B pairs is 2B rows (chosen and
  rejected), and fine-tuning trains on those 2B answers as instructions, batch 2B, unpacked. Each
  runs in a fresh process; the figure is its peak resident set size (ru_maxrss), with glibc mapping
  large blocks directly (MALLOC_MMAP_THRESHOLD_=1 MiB) so that the resident size follows live tensors.

    python benchmarks/align_speed.py
    python benchmarks/align_speed.py --steps 8 --skip-memory

Targets: DPO with LoRA peaks at most 1.3x LoRA fine-tuning of the same model and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TASKS = ["reverse", "sort", "upper", "format", "count"]

MEMORY_CHILD = r"""
import json, resource, sys
from llmlab.cli import main
code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build(root: Path, args) -> dict:
    """Data, a tokenizer, the tiny checkpoint and its HF copy."""
    from llmlab.data.prepare import TokenizerTrainConfig, train_tokenizer
    from llmlab.data.synth import SynthConfig, run as synth
    from llmlab.models import LlamaConfig, build_model
    from llmlab.models.io import copy_tokenizer_files, save_hf, save_model

    for fmt in ("alpaca", "preference", "prompt"):
        synth(SynthConfig(out_dir=str(root / fmt), tasks=TASKS, train=800, val=40, test=0, format=fmt))
    text = root / "text"
    text.mkdir()
    lines = [json.dumps(r) for r in map(json.loads, (root / "alpaca" / "train.jsonl").read_text().splitlines())]
    (text / "synth.txt").write_text("\n".join(lines))
    tok = train_tokenizer(TokenizerTrainConfig(inputs=[str(text)], out_dir=str(root / "tok"), vocab_size=1024))
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=1024, dim=args.dim, n_layers=4, n_heads=8, max_seq_len=256))
    save_model(model, root / "ckpt")
    copy_tokenizer_files(tok.parent, root / "ckpt")
    save_hf(model, root / "hf")
    copy_tokenizer_files(tok.parent, root / "hf")
    n = sum(p.numel() for p in model.parameters())
    print(f"model: LLaMA {n / 1e6:.1f}M parameters (dim {args.dim}, 4 layers, vocab 1024), LoRA r 16 on every "
          f"linear layer, fp32, {torch.get_num_threads()} threads")
    return {"ckpt": root / "ckpt", "hf": root / "hf"}


def rendered(root: Path, split: str, fmt: str) -> list[dict]:
    """The records of a split with each prompt rendered by llmlab's chat template, as TRL receives them."""
    from llmlab.tokenizer.chat import load_chat_template

    template = load_chat_template(root / "ckpt")
    out = []
    for r in map(json.loads, (root / fmt / f"{split}.jsonl").read_text().splitlines()):
        prompt = template.render([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        row = {"prompt": prompt}
        if fmt == "preference":
            row.update(chosen=r["chosen"] + template.stop, rejected=r["rejected"] + template.stop)
        else:
            row["answer"] = r["answer"]
        out.append(row)
    return out


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


# --------------------------------------------------------------------------- llmlab


def llmlab_align(root: Path, method: str, out: str, **keys) -> list[dict]:
    """Run `llmlab align` in this process; its per-step metrics records."""
    from llmlab.align.config import AlignConfig
    from llmlab.align.run import run
    from llmlab.config import from_dict

    data = "preference" if method == "dpo" else "prompt"
    cfg = from_dict(AlignConfig, {"method": method, "base": str(root / "ckpt"), "out_dir": str(root / out),
                                  "data": {"train": str(root / data / "train.jsonl"), "val_fraction": 0.0},
                                  "peft": "lora",
                                  "lora": {"r": 16, "alpha": 32, "targets": ["all-linear"]},
                                  "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0},
                                  "eval": {"every": 10_000, "answers": 0}, "ckpt": {"every": 10_000},
                                  "log_every": 1, "system": {"device": "cpu", "autocast": "none"}, **keys})
    run(cfg)
    lines = [json.loads(x) for x in (root / out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "step_s" in x]


# --------------------------------------------------------------------------- TRL


class StepTimer:
    """A transformers TrainerCallback that records the time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.callback = Callback()


def trl_common(root: Path, steps: int) -> dict:
    return dict(output_dir=str(root / "trl-out"), report_to="none", use_cpu=True, bf16=False, max_steps=steps,
                learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                logging_steps=1000, save_strategy="no", seed=0, gradient_checkpointing=False,
                dataloader_num_workers=0, disable_tqdm=True)


def hf_model_and_tokenizer(root: Path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "hf")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    return model, tokenizer


def lora():
    import peft

    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_dpo(root: Path, pairs: int, steps: int) -> list[float]:
    import datasets
    import trl

    model, tokenizer = hf_model_and_tokenizer(root)
    timer = StepTimer()
    args = trl.DPOConfig(**trl_common(root, steps), beta=0.1, per_device_train_batch_size=pairs, max_length=256)
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora(),
                             train_dataset=datasets.Dataset.from_list(rendered(root, "train", "preference")),
                             callbacks=[timer.callback])
    trainer.train()
    return timer.times


def trl_grpo(root: Path, prompts: int, group: int, new_tokens: int, steps: int) -> tuple[list[float], float]:
    """Step times, and the mean answer length TRL logged (it stops an answer at EOS)."""
    import datasets
    import trl

    model, tokenizer = hf_model_and_tokenizer(root)

    def exact_match(completions, answer, **_):
        return [float(c.strip().removesuffix("<|end|>").strip() == a) for c, a in zip(completions, answer)]

    timer = StepTimer()
    args = trl.GRPOConfig(**{**trl_common(root, steps), "logging_steps": 1}, beta=0.04, num_generations=group,
                          per_device_train_batch_size=prompts * group, max_completion_length=new_tokens,
                          temperature=1.0, top_p=1.0, num_iterations=1, loss_type="grpo")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[exact_match], args=args, processing_class=tokenizer,
                              peft_config=lora(), callbacks=[timer.callback],
                              train_dataset=datasets.Dataset.from_list(rendered(root, "train", "prompt")))
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return timer.times, statistics.mean(lengths)


def hf_generate_tokens_per_s(root: Path, prompts: int, new_tokens: int, repeats: int = 3) -> float:
    """transformers' generate through the same LoRA adapters (peft, unmerged, as TRL samples), sampling
    `new_tokens` tokens for a batch of prompts (left-padded)."""
    import peft

    model, tokenizer = hf_model_and_tokenizer(root)
    model = peft.get_peft_model(model, lora()).eval()
    tokenizer.padding_side = "left"
    texts = [r["prompt"] for r in rendered(root, "train", "prompt")[:prompts]]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    rates = []
    for i in range(repeats):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        rates.append((out.shape[1] - batch["input_ids"].shape[1]) * len(texts) / (time.perf_counter() - t0))
    return max(rates)


# --------------------------------------------------------------------------- memory


def memory(root: Path, args) -> dict:
    """Peak RSS of DPO with LoRA and of LoRA fine-tuning on the same rows, each in a fresh process."""
    from llmlab.models import LlamaConfig, build_model
    from llmlab.models.io import copy_tokenizer_files, save_model

    torch.manual_seed(0)
    big = build_model(LlamaConfig(vocab_size=1024, dim=args.memory_dim, n_layers=12, n_heads=12, max_seq_len=256))
    save_model(big, root / "big")
    copy_tokenizer_files(root / "tok", root / "big")
    n = sum(p.numel() for p in big.parameters())
    del big
    # the same answers as instructions: each pair's chosen and rejected answer after its prompt
    pairs = [json.loads(x) for x in (root / "preference" / "train.jsonl").read_text().splitlines()]
    sft = [{"instruction": p["prompt"], "input": "", "output": p[k]} for p in pairs for k in ("chosen", "rejected")]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    lora_keys = ["peft=lora", "lora.r=16", "lora.alpha=32", "lora.targets=[all-linear]", "system.device=cpu",
                 "system.autocast=none", f"max_steps={args.memory_steps}", "eval.every=10000", "ckpt.every=10000",
                 "optim.warmup_steps=0"]
    runs = {
        "finetune": ["finetune", f"base={root / 'big'}", f"data.train={root / 'sft.jsonl'}", "data.packing=false",
                     f"batch_size={2 * args.pairs}", f"out_dir={root / 'mem-ft'}", "eval.exact_match=0",
                     *lora_keys],
        "dpo": ["align", "method=dpo", f"base={root / 'big'}", f"data.train={root / 'preference' / 'train.jsonl'}",
                f"batch_size={args.pairs}", f"out_dir={root / 'mem-dpo'}", "eval.answers=0", "data.val_fraction=0",
                *lora_keys],
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "PYTHONWARNINGS": "ignore"}
    peaks = {}
    for name, argv in runs.items():
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(argv)], capture_output=True, text=True,
                             env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"code": out.returncode}
        if result["code"] != 0:
            sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        peaks[name] = result["peak"]
    print(f"\nmemory: LLaMA {n / 1e6:.1f}M parameters (dim {args.memory_dim}, 12 layers), LoRA r 16, "
          f"{args.pairs} pairs = {2 * args.pairs} rows, {args.memory_steps} steps, peak RSS")
    for name, peak in peaks.items():
        print(f"  {name:9s} {peak / 2**20:8.0f} MiB")
    ratio = peaks["dpo"] / peaks["finetune"]
    print(f"  DPO-LoRA / LoRA fine-tuning: {ratio:.2f}x (target <= 1.3x: {'met' if ratio <= 1.3 else 'NOT MET'})")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256, help="width of the tiny model (4 layers)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is left out)")
    parser.add_argument("--pairs", type=int, default=8, help="DPO pairs per step")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument("--group", type=int, default=8, help="GRPO answers per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="rollout length")
    parser.add_argument("--memory-dim", type=int, default=768, help="width of the memory model (12 layers)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args)
        rollout = {"max_new_tokens": args.new_tokens, "temperature": 1.0}
        rows = []
        for reference in ("precompute", "adapters"):
            steps = llmlab_align(root, "dpo", f"dpo-{reference}", batch_size=args.pairs, max_steps=args.steps,
                                 dpo={"beta": 0.1, "reference": reference})
            rows.append((f"DPO, {args.pairs} pairs: llmlab (reference {reference})",
                         median_after_first([s["step_s"] for s in steps])))
        if not args.skip_trl:
            rows.append((f"DPO, {args.pairs} pairs: TRL DPOTrainer", median_after_first(trl_dpo(root, args.pairs,
                                                                                                 args.steps))))
        grpo = llmlab_align(root, "grpo", "grpo", batch_size=args.prompts, max_steps=args.steps,
                            grpo={"group_size": args.group, "beta": 0.04}, rollout=rollout,
                            reward={"checker": "exact_match"})
        length = statistics.mean(s["response_length"] for s in grpo)
        rows.append((f"GRPO, {args.prompts} x {args.group} answers: llmlab ({length:.1f} tokens each)",
                     median_after_first([s["step_s"] for s in grpo])))
        if not args.skip_trl:
            times, length = trl_grpo(root, args.prompts, args.group, args.new_tokens, args.steps)
            rows.append((f"GRPO, {args.prompts} x {args.group} answers: TRL GRPOTrainer ({length:.1f} tokens each)",
                         median_after_first(times)))
        ppo = llmlab_align(root, "ppo", "ppo", batch_size=args.prompts * args.group, max_steps=args.steps,
                           rollout=rollout, reward={"checker": "exact_match"}, ppo={"epochs": 1, "mini_batches": 1})
        print(f"\n{'step (optimizer step, median after the first)':70s} {'seconds':>8s} {'vs llmlab':>10s}")
        base = {}
        for name, seconds in rows:
            kind = name.split(",")[0]
            base.setdefault(kind, seconds)
            print(f"{name:70s} {seconds:8.3f} {seconds / base[kind]:9.2f}x")
        ppo_rate = median_after_first([s["tokens_per_s"] for s in ppo])
        hf_rate = hf_generate_tokens_per_s(root, args.prompts * args.group, args.new_tokens)
        print(f"\nPPO rollouts, {args.prompts * args.group} answers x {args.new_tokens} tokens: llmlab "
              f"{ppo_rate:,.0f} tokens/s; transformers generate (same batch and LoRA, sampled) {hf_rate:,.0f} tokens/s "
              f"({ppo_rate / hf_rate:.2f}x)")
        if not args.skip_memory:
            memory(root, args)


if __name__ == "__main__":
    main()
