"""`llmlab align CONFIG method=rm|dpo|ipo|ppo|grpo`: set up, run the method's loop, export the aligned
model, and report before and after.

    run_dir/
      config.yaml  metrics.jsonl  checkpoints/    as every training verb writes them
      before.json                                 the starting model's greedy answers (report prompts)
      report.json                                 exact match before/after, win rate (rm: held-out accuracy)
      final/                                      the aligned model (rm: the reward model) with its tokenizer
      adapter/                                    LoRA runs: the adapter alone (PEFT format)
"""

from __future__ import annotations

import importlib

from llmlab.align.config import AlignConfig
from llmlab.align.online import Rewards
from llmlab.align.policy import export
from llmlab.align.report import final_report, record_before
from llmlab.align.setup import setup

LOOPS = {"rm": "llmlab.align.rm", "dpo": "llmlab.align.dpo", "ipo": "llmlab.align.dpo", "ppo": "llmlab.align.ppo",
         "grpo": "llmlab.align.grpo"}


def run(cfg: AlignConfig, *, overwrite: bool = False) -> dict:
    """Align; returns {"method", "step", "stopped", "val_loss", "final", "adapter", "report", ...}.
    `overwrite` starts over in an out_dir that holds an earlier run's checkpoints or other files."""
    ctx = setup(cfg, overwrite=overwrite)
    if cfg.method != "rm":  # a reward model or checker that cannot be used fails before anything is written
        ctx.rewards = Rewards(ctx)
    ctx.start()
    record_before(ctx)
    result = importlib.import_module(LOOPS[cfg.method]).train(ctx)
    final = adapter = None
    report = {}
    if ctx.rank == 0:
        final, adapter = export(ctx.policy, ctx.out, cfg.base, cfg.lora if ctx.lora else None, ctx.template)
        report = final_report(ctx) if result["stopped"] in ("max_steps", "early_stopping") else {}
        print(f"stopped after step {ctx.counters.step} ({result['stopped']}); model {final}"
              + (f"; adapter {adapter}" if adapter else ""))
    return {"method": cfg.method, "step": ctx.counters.step, "skipped": ctx.counters.skipped, "final": final,
            "adapter": adapter, "report": report, **result}
