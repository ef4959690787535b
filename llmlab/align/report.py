"""The run's report, before and after: held-out prompts answered greedily by the starting model (at
the first step, kept in `before.json`) and by the aligned one, scored by exact match against their
reference answers (per task), and judged against each other by the reward model or the checker
(win rate: a win 1, a tie 1/2). A reward model's report is its held-out preference accuracy."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from llmlab.align.online import Rewards
from llmlab.align.rollout import layout, sample
from llmlab.align.setup import Context
from llmlab.common import LlmlabError, atomic_write_text
from llmlab.data.preference import PairExample, PromptExample
from llmlab.eval.metrics import exact_match
from llmlab.generate import SamplingParams

BEFORE = "before.json"
REPORT = "report.json"


def report_prompts(ctx: Context) -> list[PromptExample]:
    """The first eval.answers held-out prompts (a pair's prompt, with its chosen answer as reference)."""
    chosen = ctx.val[:ctx.cfg.eval.answers]
    if not chosen or isinstance(chosen[0], PromptExample):
        return list(chosen)
    texts = ctx.template.render_many([(e.prompt, True) for e in chosen])
    return [PromptExample(ctx.tokenizer.encode(t), e.prompt, e.chosen, e.task, e.where)
            for t, e in zip(texts, chosen)]


@torch.no_grad()
def greedy_answers(ctx: Context, examples: list[PromptExample]) -> list[dict]:
    params = SamplingParams(max_new_tokens=ctx.cfg.rollout.max_new_tokens, temperature=0.0)
    out = []
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        roll = sample(ctx.policy.model, ctx.tokenizer, ctx.template, [e.prompt_ids for e in chunk], params,
                      ctx.device)
        out += [{"text": t, "ids": a, "finished": f} for t, (_, a), f in zip(roll.texts, roll.rows, roll.finished)]
    return out


def record_before(ctx: Context) -> None:
    """The starting model's answers, written once at a fresh start (a resumed run reads them)."""
    if ctx.cfg.method == "rm" or ctx.rank != 0 or ctx.counters.step or not ctx.cfg.eval.answers:
        return
    examples = report_prompts(ctx)
    if examples:
        atomic_write_text(ctx.out / BEFORE, json.dumps({"answers": greedy_answers(ctx, examples)}))


def final_report(ctx: Context) -> dict:
    """Before and after, printed and written to report.json; returns it."""
    if ctx.cfg.method == "rm":
        report = _reward_model_report(ctx)
    else:
        report = _policy_report(ctx, ctx.rewards)
    if report:
        atomic_write_text(ctx.out / REPORT, json.dumps(report, indent=2))
    return report


def _policy_report(ctx: Context, rewards: Rewards) -> dict:
    examples = report_prompts(ctx)
    path = ctx.out / BEFORE
    if not examples or not path.is_file():
        return {}
    try:
        before = json.loads(Path(path).read_text(encoding="utf-8"))["answers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LlmlabError(f"{path}: unreadable ({e}); it holds the starting model's answers") from None
    if len(before) != len(examples):
        raise LlmlabError(f"{path}: {len(before)} answers for {len(examples)} held-out prompts")
    after = greedy_answers(ctx, examples)
    tasks: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"before": [], "after": []})
    for e, b, a in zip(examples, before, after):
        if e.answer is not None:
            for name, answer in (("before", b), ("after", a)):
                tasks[e.task or "all"][name].append(exact_match(answer["text"], e.answer, ignore_whitespace=True))
    judged = {name: _judge(ctx, rewards, examples, answers) for name, answers in (("before", before),
                                                                                   ("after", after))}
    valid = judged["before"][1] & judged["after"][1]
    diff = (judged["after"][0] - judged["before"][0])[valid]
    wins = ((diff > 0).float() + 0.5 * (diff == 0).float())
    report = {"method": ctx.cfg.method, "prompts": len(examples), "judge": rewards.judge,
              "win_rate": wins.mean().item() if len(wins) else None,
              "mean_reward": {k: v[0][valid].mean().item() if bool(valid.any()) else None for k, v in judged.items()},
              "exact_match": {t: {k: sum(v) / len(v) for k, v in r.items()} for t, r in sorted(tasks.items())}}
    if tasks:
        every = {k: [x for r in tasks.values() for x in r[k]] for k in ("before", "after")}
        report["exact_match"]["overall"] = {k: sum(v) / len(v) for k, v in every.items()}
    _print(report)
    return report


def _judge(ctx: Context, rewards: Rewards, examples: list[PromptExample], answers: list[dict]):
    rows = [(list(e.prompt_ids), list(a["ids"])) for e, a in zip(examples, answers)]
    roll = layout(rows, [a["text"] for a in answers], [a["finished"] for a in answers], list(range(len(rows))),
                  ctx.pad_id(), ctx.device)
    scores, valid, _ = rewards(roll, examples)
    return scores.cpu(), valid.cpu()


@torch.no_grad()
def _reward_model_report(ctx: Context) -> dict:
    from llmlab.align.rm import pair_scores
    from llmlab.data.preference import collate_pairs

    pairs: list[PairExample] = ctx.val
    if not pairs:
        return {}
    ctx.policy.eval()
    margins = []
    for i in range(0, len(pairs), ctx.cfg.batch_size):
        batch = collate_pairs(pairs[i:i + ctx.cfg.batch_size], ctx.pad_id(), ctx.device)
        chosen, rejected = pair_scores(ctx.policy.model, batch)
        margins.append(chosen - rejected)
    margin = torch.cat(margins).float()
    by_task: dict[str, list[bool]] = defaultdict(list)
    for p, m in zip(pairs, margin.tolist()):
        by_task[p.task or "all"].append(m > 0)
    report = {"method": "rm", "pairs": len(pairs), "accuracy": (margin > 0).float().mean().item(),
              "margin": margin.mean().item(),
              "accuracy_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}
    print(f"reward model: held-out preference accuracy {report['accuracy']:.1%} on {len(pairs)} pairs (mean "
          f"margin {report['margin']:.3f}; an untrained head scores every answer alike)")
    return report


def _print(report: dict) -> None:
    print(f"report ({report['prompts']} held-out prompts, greedy):")
    for task, r in report["exact_match"].items():
        print(f"  exact match {task:10s} {r['before']:6.1%} -> {r['after']:6.1%}")
    if report["win_rate"] is not None:
        print(f"  win rate against the starting model: {report['win_rate']:.1%} (judged by the {report['judge']})")
