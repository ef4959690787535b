"""Evaluation speed: llmlab's evaluator against lm-evaluation-harness's `hf` backend, side by side.

One 14M-parameter LLaMA (the `14m` config of train_throughput.py, random weights) is exported to
HF format with a BPE tokenizer trained on the CPython documentation. Both harnesses score the same
task YAML: the built-in `pydoc-cloze` multiple-choice questions (a documentation sentence cut
before a word, that word against three others), written out as local JSONL. Each side runs the
whole task (loading the YAML and data, building prompts, scoring every choice, aggregating) in
this process, the two alternating `--repeats` times; the script prints both times, the ratio, and
checks that the accuracies are equal and the log-likelihoods agree within 1e-4.

llmlab scores a question's choices with one prefill of the shared context and one batched pass
over the choices from the copied KV cache; lm-eval's hf backend runs context + choice as one row
per choice.

    python benchmarks/eval_speed.py                    # 200 questions, lm-eval at batch sizes 1 and 32
    python benchmarks/eval_speed.py --questions 400 --hf-batch-sizes 64

Target on 2 CPU cores: llmlab at least 3x faster than lm-eval's hf backend at its default batch
size, with the same scores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmlab.eval import LocalLM, evaluate_task, load_task_file
from llmlab.eval.builtin import pydoc_cloze
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_hf
from llmlab.tokenizer import train_bpe

MODEL = LlamaConfig(vocab_size=8192, dim=384, n_layers=6, n_heads=6, max_seq_len=256, tie_embeddings=True)

TASK = """task: cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def build(root: Path, questions: int) -> tuple[Path, Path]:
    from llmlab.data.ingest import default_corpus

    tok = train_bpe((d.text for d in default_corpus()), vocab_size=MODEL.vocab_size)
    torch.manual_seed(0)
    model = build_model(MODEL)
    save_hf(model, root / "hf")
    tok.save(root / "hf", model_max_length=MODEL.max_seq_len)
    docs = pydoc_cloze(questions)[0].docs
    (root / "cloze.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks").mkdir()
    (root / "tasks" / "cloze.yaml").write_text(TASK.format(data=root / "cloze.jsonl"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LLaMA {n_params / 1e6:.1f}M parameters, context {MODEL.max_seq_len}; "
          f"{len(docs)} questions x 4 choices")
    return root / "hf", root / "tasks"


def run_llmlab(hf: Path, tasks: Path, batch_size: int):
    lm = LocalLM.from_path(hf, batch_size=batch_size)
    t0 = time.perf_counter()
    result = evaluate_task(load_task_file(tasks / "cloze.yaml"), lm, bootstrap_iters=0)
    return time.perf_counter() - t0, result.metrics["acc"], [s["loglikelihoods"] for s in result.samples]


def run_harness(hf: Path, tasks: Path, batch_size: int, lm_cache: dict):
    import lm_eval
    from lm_eval.tasks import TaskManager

    if batch_size not in lm_cache:  # the model load is not timed, as llmlab's is not
        from lm_eval.models.huggingface import HFLM

        lm_cache[batch_size] = HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm_cache[batch_size], tasks=["cloze"], task_manager=TaskManager(
        include_path=str(tasks)), log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"]["cloze"], key=lambda s: s["doc_id"])
    return seconds, out["results"]["cloze"]["acc,none"], [[r[0][0] for r in s["resps"]] for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="llmlab's batch of questions")
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[1, 32],
                    help="lm-eval hf batch sizes (1 is its command line's default)")
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "cache")
        hf, tasks = build(Path(tmp), args.questions)
        times: dict[str, list[float]] = {"llmlab": []}
        lm_cache: dict = {}
        for _ in range(args.repeats):
            seconds, ours_acc, ours = run_llmlab(hf, tasks, args.batch_size)
            times["llmlab"].append(seconds)
            for bs in args.hf_batch_sizes:
                seconds, their_acc, theirs = run_harness(hf, tasks, bs, lm_cache)
                times.setdefault(f"lm-eval hf, batch {bs}", []).append(seconds)
                worst = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
                assert ours_acc == their_acc, f"accuracy differs: llmlab {ours_acc}, lm-eval {their_acc}"
                assert worst < 1e-4, f"log-likelihoods differ by up to {worst:.2e}"
        print(f"same scores: acc {ours_acc:.4f} on both; log-likelihoods within {worst:.1e}")
        ours_t = statistics.median(times["llmlab"])
        print(f"{'llmlab':28s} {ours_t:7.2f} s")
        for name, ts in times.items():
            if name != "llmlab":
                t = statistics.median(ts)
                print(f"{name:28s} {t:7.2f} s   llmlab is {t / ours_t:.1f}x faster")


if __name__ == "__main__":
    main()
