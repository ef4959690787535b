"""Encoders and T5 on this CPU: what pretraining with MLM buys, dynamic against static masking,
ALBERT against BERT at equal width, and T5 learning a seq2seq task.

Every run is a `llmlab` command's config, run in this process:

1. `llmlab tokenizer train kind=wordpiece` and `llmlab data prepare` on the embedded corpus (the
   CPython docs, ~100k tokens);
2. BERT (configs/pretrain/bert-cpu-tiny.yaml: 4 layers, width 128) pretrained with masked LM for
   --steps steps with dynamic masking (RoBERTa's) and with static masking (BERT's: one mask per
   sequence for good), and ALBERT (configs/pretrain/albert-cpu-tiny.yaml: E = 32, one block shared
   by the 4 layers) with dynamic masking: validation MLM loss at equal steps, and parameter counts;
3. `llmlab data tasks task=sentiment`, then `llmlab finetune task=classify` (full, --ft-steps)
   from the dynamic-masking BERT and from the same architecture with random weights: held-out
   accuracy;
4. `llmlab data tasks task=summarize` (keep the capitalised names of a sentence), and a T5 (3 + 3
   layers, width 128, GEGLU) from random weights with a byte-level BPE, `llmlab finetune
   task=seq2seq`: held-out exact match of greedy decoding;
5. `llmlab eval`: the three masked LMs and a random BERT on `pydoc-cloze` (four choices, scored by
   pseudo-log-likelihood), and the T5 on the summaries' test file (exact match, BLEU, ROUGE).

    python benchmarks/encoders.py                    # ~15 minutes on 2 cores
    python benchmarks/encoders.py --steps 100 --ft-steps 40 --t5-steps 100   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from llmlab.config import load_config
from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, train_tokenizer
from llmlab.data.prepare import run as prepare
from llmlab.data.synth_tasks import TaskSynthConfig
from llmlab.data.synth_tasks import run as synth_tasks
from llmlab.eval.run import EvalConfig
from llmlab.eval.run import run as evaluate
from llmlab.models import T5Config, build_model
from llmlab.models.io import copy_tokenizer_files, read_config, save_model
from llmlab.tokenizer import train_bpe
from llmlab.train.checkpoint import latest_checkpoint
from llmlab.train.finetune import FinetuneConfig
from llmlab.train.finetune import run as finetune
from llmlab.train.pretrain import PretrainConfig
from llmlab.train.pretrain import run as pretrain

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def _pretrain(name: str, out: Path, data: Path, steps: int, *extra: str) -> dict:
    cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml",
                      [f"data={data}", f"out_dir={out}", f"max_steps={steps}", f"eval.every={steps}",
                       "ckpt.every=100000", *extra])
    result = pretrain(cfg)
    result["params"] = cfg.model.num_params().total
    return result


def _finetune(base: Path, out: Path, task: str, train: Path, val: Path, steps: int, lr: float, batches: int) -> dict:
    cfg = load_config(FinetuneConfig, None, [f"task={task}", f"base={base}", f"out_dir={out}", f"data.train={train}",
                                             f"data.val={val}", "peft=none", f"max_steps={steps}", "batch_size=32",
                                             f"eval.every={steps}", f"eval.batches={batches}", f"optim.lr={lr}",
                                             f"optim.warmup_steps={max(1, steps // 10)}"])
    return finetune(cfg)


def _eval(models: list[Path], tasks: list[str], out: Path) -> dict:
    """{(model's folder name, task, metric): value} of `llmlab eval MODELS tasks=TASKS`."""
    results = evaluate(load_config(EvalConfig, None, [f"tasks=[{','.join(tasks)}]", f"out_dir={out}",
                                                      "bootstrap_iters=0"]), [str(m) for m in models], quiet=True)
    return {(Path(r["model"]).name, r["task"], r["metric"]): r["value"] for r in results["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps of each encoder")
    parser.add_argument("--ft-steps", type=int, default=150, help="sentiment fine-tuning steps")
    parser.add_argument("--t5-steps", type=int, default=400, help="T5 fine-tuning steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = train_tokenizer(TokenizerTrainConfig(kind="wordpiece", vocab_size=8192, out_dir=str(root / "tok")))
        prepare(PrepareConfig(tokenizer=str(tok), out_dir=str(root / "data")))
        runs = {"bert, dynamic masking": _pretrain("bert-cpu-tiny", root / "dynamic", root / "data", args.steps),
                "bert, static masking": _pretrain("bert-cpu-tiny", root / "static", root / "data", args.steps,
                                                  "masking.static=true"),
                "albert, dynamic masking": _pretrain("albert-cpu-tiny", root / "albert", root / "data", args.steps)}
        print(f"\nmasked LM, {args.steps} steps of 32 x 128 tokens: validation loss per masked token")
        for name, r in runs.items():
            print(f"  {name:26s} {r['params'] / 1e6:6.2f}M parameters   val_loss {r['val_loss']:.4f}")

        sentiment = root / "sentiment"
        synth_tasks(TaskSynthConfig(task="sentiment", out_dir=str(sentiment)))
        pretrained = latest_checkpoint(root / "dynamic" / "checkpoints", clean=False)
        random = root / "bert-random"
        torch.manual_seed(0)
        save_model(build_model(read_config(pretrained)[0]), random)
        copy_tokenizer_files(pretrained, random)
        scores = {}
        for name, base in (("pretrained with MLM", pretrained), ("random weights", random)):
            r = _finetune(base, root / f"ft-{name[:4]}", "classify", sentiment / "train.tsv", sentiment / "val.tsv",
                          args.ft_steps, 3e-4, 7)
            scores[name] = r["metrics"]
        print(f"\nsentiment (synthetic, 2,000 training reviews), {args.ft_steps} steps of 32, full fine-tuning:")
        for name, m in scores.items():
            print(f"  BERT {name:20s} accuracy {m['accuracy']:.3f}   macro F1 {m['macro_f1']:.3f}")
        cloze = _eval([random, root / "static", root / "dynamic", root / "albert"], ["pydoc-cloze"], root / "ev-mlm")
        print("\npydoc-cloze (200 four-choice questions), scored by pseudo-log-likelihood: accuracy")
        for name in ("bert-random", "static", "dynamic", "albert"):
            print(f"  {name:12s} {cloze[(name, 'pydoc-cloze', 'acc')]:.3f}")

        summarize = root / "summarize"
        synth_tasks(TaskSynthConfig(task="summarize", out_dir=str(summarize)))
        texts = [v for line in (summarize / "train.jsonl").read_text().splitlines()
                 for v in (json.loads(line)["source"], json.loads(line)["target"])]
        bpe = train_bpe(texts, 1000)
        t5 = root / "t5-random"
        torch.manual_seed(0)
        save_model(build_model(T5Config(vocab_size=bpe.vocab_size, dim=128, n_layers=3, n_heads=4, head_dim=32,
                                        hidden_dim=512, mlp="gated-gelu", tie_embeddings=False, max_seq_len=64,
                                        max_target_len=32, dropout=0.0, eos_id=bpe.eos_id, pad_id=bpe.pad_id,
                                        decoder_start_id=bpe.pad_id)), t5)
        bpe.save(t5)
        r = _finetune(t5, root / "t5", "seq2seq", summarize / "train.jsonl", summarize / "val.jsonl", args.t5_steps,
                      1e-3, 7)
        print(f"\nT5 from random weights, summarize (keep the names), {args.t5_steps} steps of 32: "
              f"held-out exact match {r['metrics']['exact_match']:.3f}, BLEU {r['metrics']['bleu']:.1f}")
        test = _eval([root / "t5"], [f"seq2seq:{summarize / 'test.jsonl'}"], root / "ev-t5")
        print("  llmlab eval on the test file: " + "  ".join(f"{m} {v:.3f}" for (_, _, m), v in test.items()))


if __name__ == "__main__":
    main()
