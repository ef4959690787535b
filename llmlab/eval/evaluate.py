"""Run a task against a model: build the requests, ask the model, filter the answers, score them.

`evaluate_task(task, lm)` returns one `TaskResult`: per-sample records (what `samples.jsonl`
holds) and per-metric values with bootstrap standard errors. Scores follow
lm-evaluation-harness's definitions (`llmlab.eval.metrics`), so the same task file gives the
same numbers under both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from llmlab.eval import metrics as M
from llmlab.eval.lm import EvalError
from llmlab.eval.loss import IGNORE, token_loss
from llmlab.eval.tasks import Filter, Prepared, Renderer, Task, gold_index, prepare


@dataclass
class TaskResult:
    task: str
    output_type: str
    n: int
    fewshot: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)  # "metric" or "metric,filter" -> value
    stderr: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # confusion matrices, per-group breakdowns
    samples: list[dict] = field(default_factory=list)
    version: Any = None


def evaluate_task(task: Task, lm, *, renderer: Renderer | None = None, num_fewshot: int | None = None,
                  limit: int | None = None, seed: int = 1234, bootstrap_iters: int = 1000,
                  code_timeout: float = 5.0, prepared: Prepared | None = None) -> TaskResult:
    """Score `lm` (a `LocalLM` or `ServerLM`) on `task`; `seed` draws the few-shot examples. `prepared`
    is what `prepare` gave for these settings, when the caller has it already."""
    check_task(task, lm)
    if prepared is None:
        prepared = prepare(task, renderer or Renderer(), num_fewshot=num_fewshot, limit=limit, seed=seed)
    if any(isinstance(c, list) for c in prepared.contexts):  # chat messages: this model's own template
        prepared = replace(prepared, contexts=[lm.chat_prompt(c) if isinstance(c, list) else c
                                               for c in prepared.contexts], stops=[lm.chat_stop])
    result = TaskResult(task.name, task.output_type, len(prepared.docs), prepared.fewshot, seed, version=task.version)
    scorer = {"multiple_choice": _multiple_choice, "loglikelihood": _loglikelihood,
              "loglikelihood_rolling": _rolling, "generate_until": _generate, "tokens": _tokens,
              "fill_mask": _fill_mask, "classification": _classification,
              "token_classification": _token_classification, "extractive_qa": _extractive_qa}[task.output_type]
    per_sample, aggregates = scorer(task, prepared, lm, result, code_timeout)
    for key, (values, aggregate) in aggregates.items():
        result.metrics[key] = aggregate(values)
        result.stderr[key] = M.bootstrap_stderr(values, aggregate, iters=bootstrap_iters, seed=seed)
    if task.group_by is not None:  # per-sample scores by group: the synthetic tasks' per-task accuracy
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(prepared.docs):
            groups.setdefault(str(d.get(task.group_by)), []).append(i)
        result.extra["by_" + task.group_by] = {
            g: {k: M.mean([per_sample[i][k] for i in rows]) for k in result.metrics if k in per_sample[rows[0]]}
            for g, rows in groups.items()}
    result.samples = per_sample
    return result


def _sample(prepared: Prepared, i: int, **fields) -> dict:
    return {"doc_id": i, "where": prepared.where[i], "context": prepared.contexts[i], **fields}


# --------------------------------------------------------------------------- log-likelihood tasks


def _multiple_choice(task: Task, p: Prepared, lm, result: TaskResult, _code_timeout):
    requests, owner = [], []
    for i, (ctx, choices) in enumerate(zip(p.contexts, p.choices)):
        for c in choices:
            requests.append((ctx, task.target_delimiter + c))
            owner.append(i)
    answers = lm.loglikelihood(requests)
    per_doc: list[list[tuple[float, bool]]] = [[] for _ in p.docs]
    for i, a in zip(owner, answers):
        per_doc[i].append(a)
    wanted = [m for m, _ in task.metrics]
    samples, columns = [], {m: [] for m in wanted}
    golds, preds, confidences, correct = [], [], [], []
    for i, scores in enumerate(per_doc):
        lls = [s for s, _ in scores]
        gold = gold_index(task, p.targets[i], p.choices[i], p.where[i])
        s = M.choice_scores(lls, p.choices[i], gold)
        first = gold if isinstance(gold, int) else gold[0]
        golds.append(p.choices[i][first])
        preds.append(p.choices[i][s["pred"]])
        confidences.append(s["confidence"])
        correct.append(s["acc"])
        row = {"acc": s["acc"], "acc_norm": s["acc_norm"], "brier_score": s["brier_score"],
               "likelihood_gap": lls[first] - max((x for j, x in enumerate(lls) if j != first), default=lls[first])}
        for m in wanted:
            if m in row:
                columns[m].append(row[m])
        samples.append(_sample(p, i, choices=p.choices[i], target=gold, loglikelihoods=lls,
                               greedy=[g for _, g in scores], pred=s["pred"],
                               **{m: row[m] for m in wanted if m in row}))
    aggregates = {m: (columns[m], M.mean) for m in wanted if m in ("acc", "acc_norm", "brier_score", "likelihood_gap")}
    if "f1" in wanted:
        pairs = list(zip(golds, preds))
        aggregates["f1"] = (pairs, lambda ps: M.classification_report([g for g, _ in ps],
                                                                       [q for _, q in ps])["macro_f1"])
        result.extra["classification"] = M.classification_report(golds, preds)
    if "ece" in wanted:
        pairs = list(zip(confidences, correct))
        aggregates["ece"] = (pairs, lambda ps: M.expected_calibration_error([c for c, _ in ps], [a for _, a in ps]))
    return samples, aggregates


def _loglikelihood(task: Task, p: Prepared, lm, _result, _code_timeout):
    targets = [str(t) for t in p.targets]
    answers = lm.loglikelihood(list(zip(p.contexts, targets)))
    samples = [_sample(p, i, target=t, loglikelihood=ll, greedy=g)
               for i, (t, (ll, g)) in enumerate(zip(targets, answers))]
    lls = [ll for ll, _ in answers]
    aggregates = {}
    wanted = [m for m, _ in task.metrics]
    if "perplexity" in wanted:  # the harness's perplexity of a loglikelihood task: exp(-mean log p)
        aggregates["perplexity"] = (lls, lambda xs: math.exp(min(-M.mean(xs), 700.0)))
    if "acc" in wanted:
        aggregates["acc"] = ([float(g) for _, g in answers], M.mean)
    return samples, aggregates


def _rolling(task: Task, p: Prepared, lm, _result, _code_timeout):
    texts = [str(t) for t in p.targets] if task.doc_to_target is not None else [str(t) for t in p.texts]
    for text, where in zip(texts, p.where):
        if not text.strip():
            raise EvalError(f"{where}: no text to score (task {task.name})")
    lls = lm.loglikelihood_rolling(texts)
    counts = [(ll, len(re.split(r"\s+", t)), len(t.encode("utf-8")), _n_tokens(lm, t)) for ll, t in zip(lls, texts)]
    samples = [_sample(p, i, loglikelihood=ll, words=w, bytes=b, tokens=n)
               for i, (ll, w, b, n) in enumerate(counts)]
    aggregates = {}
    for m, _ in task.metrics:
        unit = {"word_perplexity": 1, "byte_perplexity": 2, "bits_per_byte": 2, "token_perplexity": 3}[m]
        if m == "bits_per_byte":
            aggregates[m] = (counts, lambda cs: M.bits_per_byte([c[0] for c in cs], [c[2] for c in cs]))
        else:
            aggregates[m] = (counts, lambda cs, u=unit: M.perplexity([c[0] for c in cs], [c[u] for c in cs]))
    return samples, aggregates


def _tokens(task: Task, p: Prepared, lm, _result, _code_timeout):
    """A prepared split's tokens: each document continues from the token before it, and is scored in
    rows of the model's context by training's loss (`llmlab.eval.loss`), or through a server in the
    harness's rolling windows."""
    from llmlab.eval.lm import rolling_windows

    shards = task.shards
    sha = getattr(getattr(lm, "tokenizer", None), "sha256", None)
    if sha is not None and sha() != shards.manifest.get("tokenizer_sha256"):
        raise EvalError(f"{task.source}: these shards were tokenized with another tokenizer than the model's "
                        f"(sha256 {shards.manifest.get('tokenizer_sha256', '?')[:12]} in the manifest); score the "
                        "text itself instead (a task of its files), or prepare it with the model's tokenizer")
    docs = [([int(shards.get(d["start"] - 1, 1)[0]) if d["start"] else lm.prefix_id],
             shards.get(d["start"], d["tokens"]).tolist()) for d in p.docs]
    kind = getattr(lm, "kind", None)
    if kind == "decoder":  # in process: training's own loss, computed blockwise without the logits
        device = next(lm.model.parameters()).device
        lls = [-token_loss(lm.model, [_windows(prefix + ids, lm.max_length, device)]).nats for prefix, ids in docs]
    elif kind is not None:  # T5 and encoders score a long text in pieces, each after the text before it
        lls = [s.logprob for s in lm.score_tokens([(prefix if d["start"] else [], ids)
                                                   for (prefix, ids), d in zip(docs, p.docs)])]
    else:
        windows, owner = [], []
        for i, (prefix, ids) in enumerate(docs):
            for w in rolling_windows(ids, prefix[0], lm.max_length):
                windows.append(w)
                owner.append(i)
        lls = [0.0] * len(p.docs)
        for i, s in zip(owner, lm.score_tokens(windows)):
            lls[i] += s.logprob
    bytes_per_token = shards.bytes / max(len(shards), 1)
    counts = [(ll, d["tokens"]) for ll, d in zip(lls, p.docs)]
    samples = [_sample(p, i, loglikelihood=ll, tokens=n) for i, (ll, n) in enumerate(counts)]
    aggregates = {
        "token_perplexity": (counts, lambda cs: M.perplexity([c[0] for c in cs], [c[1] for c in cs])),
        "bits_per_byte": (counts, lambda cs: M.bits_per_byte([c[0] for c in cs],
                                                              [c[1] * bytes_per_token for c in cs]))}
    return samples, {m: aggregates[m] for m, _ in task.metrics}


def _windows(seq: list[int], length: int, device) -> dict:
    """`seq` cut into rows of `length` inputs, each row's targets the next tokens (-100 past the end):
    every token after the first predicted once, from the tokens before it in its row."""
    import torch

    rows = range(0, len(seq) - 1, length)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for r, k in enumerate(rows):
        chunk = torch.tensor(seq[k:k + length + 1])
        ids[r, :len(chunk) - 1], targets[r, :len(chunk) - 1] = chunk[:-1], chunk[1:]
    return {"input_ids": ids.to(device), "targets": targets.to(device)}


def _n_tokens(lm, text: str) -> int:
    encode = getattr(lm, "encode", None)
    return len(encode(text)) if encode is not None else 0


# --------------------------------------------------------------------------- encoders and task files


SCORED_BY_MLM = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "tokens", "fill_mask")
HEAD_TASKS = {"classification": "classify", "token_classification": "tokens", "extractive_qa": "span"}


def check_task(task: Task, lm) -> None:
    """Refuse, before anything is scored, a task this model cannot answer: generation from an
    encoder, fill-mask from anything but a masked LM, a task file that needs a head the model lacks,
    or a head without its labels.json."""
    kind, head, t = getattr(lm, "kind", "server"), getattr(lm, "head", None), task.output_type
    name = getattr(lm, "name", "the model")
    has = f"{name} has the {head} head" if head else f"{name} is {_a(kind)}"
    if kind != "encoder":
        if t in ("fill_mask", "token_classification"):
            what = "its masked-LM head" if t == "fill_mask" else "the tokens head of `llmlab finetune task=tokens`"
            raise EvalError(f"{t} tasks need an encoder with {what}; {has}")
        return
    if t == "generate_until":
        raise EvalError(f"an encoder does not generate text, and {t} tasks need a decoder or T5 ({has}); an encoder "
                        "with its masked-LM head takes multiple_choice, loglikelihood, perplexity and fill_mask tasks, "
                        "and a fine-tuned head the task file of its task (classify:, tokens: or span:)")
    if t in SCORED_BY_MLM:
        need = "mlm"
    elif t == "classification":  # by its classify head, or zero-shot by a masked LM
        need = None if head in ("classify", "mlm") else "classify"
    else:
        need = HEAD_TASKS.get(t)
    if need is not None and head != need:
        what = "its masked-LM head" if need == "mlm" else f"the {need} head of `llmlab finetune task={need}`"
        raise EvalError(f"{t} tasks need an encoder with {what}; {has}")
    if head in ("classify", "tokens") and lm.labels is None:
        raise EvalError(f"{name} has no labels.json naming its labels by index (task fine-tuning writes one "
                        "beside the model); without it, the file's labels cannot be matched to the model's outputs")


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind + " model"


def _known(lm, what: str, names: list[tuple[list[str], str]]) -> None:
    """Refuse the first label (tag) of the (names, where) pairs that the model was not trained on."""
    for group, where in names:
        unknown = next((n for n in group if n not in lm.labels), None)
        if unknown is not None:
            raise EvalError(f"{where}: {what} {unknown!r} is not one the model was trained on "
                            f"({', '.join(lm.labels)})"[:400])


def _fill_mask(task: Task, p: Prepared, lm, _result, _code_timeout):
    answers = lm.fill_mask(list(zip(p.contexts, [str(t) for t in p.targets])), p.where)
    samples = [_sample(p, i, target=p.targets[i], **a) for i, a in enumerate(answers)]
    return samples, {m: ([a[m] for a in answers], M.mean) for m, _ in task.metrics}


def _classification(task: Task, p: Prepared, lm, result: TaskResult, code_timeout):
    """A classify head's labels; any other model picks the label whose name it finds most likely."""
    if getattr(lm, "head", None) != "classify":
        return _multiple_choice(task, p, lm, result, code_timeout)
    examples = task.examples[:len(p.docs)]
    golds = [task.labels[e.label] for e in examples]
    _known(lm, "label", [([g], e.where) for g, e in zip(golds, examples)])
    preds = lm.classify(examples)
    samples = [_sample(p, i, target=g, pred=q, acc=float(g == q)) for i, (g, q) in enumerate(zip(golds, preds))]
    result.extra["classification"] = M.classification_report(golds, preds)
    pairs = list(zip(golds, preds))
    aggregates = {"acc": ([float(g == q) for g, q in pairs], M.mean),
                  "f1": (pairs, lambda ps: M.classification_report([g for g, _ in ps], [q for _, q in ps])["macro_f1"])}
    return samples, {m: aggregates[m] for m, _ in task.metrics}


def _token_classification(task: Task, p: Prepared, lm, result: TaskResult, _code_timeout):
    from llmlab.eval.heads import tagging_scores

    examples = task.examples[:len(p.docs)]
    golds = [[task.labels[t] for t in e.tags] for e in examples]
    _known(lm, "tag", [(g, e.where) for g, e in zip(golds, examples)])
    preds = lm.tag(examples)
    samples = [_sample(p, i, tokens=e.tokens, target=g, pred=q) for i, (e, g, q) in enumerate(zip(examples, golds,
                                                                                                   preds))]
    result.extra["tagging"] = tagging_scores(golds, preds)
    pairs = list(zip(golds, preds))
    return samples, {m: (pairs, lambda ps, m=m: tagging_scores([g for g, _ in ps], [q for _, q in ps])[m])
                     for m, _ in task.metrics}


def _extractive_qa(task: Task, p: Prepared, lm, _result, _code_timeout):
    """A span head's answers; any other model answers by greedy generation after the QA prompt."""
    from llmlab.eval.heads import qa_scores

    examples = task.examples[:len(p.docs)]
    if getattr(lm, "head", None) == "span":
        answers = lm.answer(examples, allow_null=any(e.is_impossible for e in task.examples))
    else:
        answers = [a.strip() for a in lm.generate_until([(c, task.generation_kwargs) for c in p.contexts])]
    scores = [qa_scores(a, e.answers) for a, e in zip(answers, examples)]
    samples = [_sample(p, i, target=e.answers, pred=a, exact_match=em, f1=f1)
               for i, (e, a, (em, f1)) in enumerate(zip(examples, answers, scores))]
    columns = {"exact_match": [em for em, _ in scores], "f1": [f1 for _, f1 in scores]}
    return samples, {m: (columns[m], M.mean) for m, _ in task.metrics}


# --------------------------------------------------------------------------- generation


def _generate(task: Task, p: Prepared, lm, result: TaskResult, code_timeout: float):
    gen = dict(task.generation_kwargs)
    gen["until"] = list(gen.get("until") or []) + p.stops
    requests = [(ctx, gen) for ctx in p.contexts for _ in range(task.repeats)]
    outputs = lm.generate_until(requests)
    responses = [outputs[i * task.repeats:(i + 1) * task.repeats] for i in range(len(p.docs))]
    golds = [_gold_text(task, p, i) for i in range(len(p.docs))]
    samples = [_sample(p, i, target=golds[i], responses=responses[i]) for i in range(len(p.docs))]
    aggregates: dict[str, tuple[list, Any]] = {}
    for flt in task.filters:
        filtered = [apply_filter(flt, r) for r in responses]
        suffix = "" if flt.name == "none" and len(task.filters) == 1 else f",{flt.name}"
        for i, s in enumerate(samples):
            s.setdefault("filtered", {})[flt.name] = filtered[i]
        for metric, options in task.metrics:
            key = metric + suffix
            if metric == "pass_at_k":
                _pass_at_k(task, p, filtered, options, aggregates, samples, suffix, code_timeout)
                continue
            if metric in ("bleu", "rouge1", "rouge2", "rougeL"):
                pairs = [(_first(f), g[0]) for f, g in zip(filtered, golds)]
                agg = (lambda ps: M.bleu([a for a, _ in ps], [b for _, b in ps])) if metric == "bleu" else \
                    (lambda ps, m=metric: M.rouge([a for a, _ in ps], [b for _, b in ps])[m])
                aggregates[key] = (pairs, agg)
                continue
            values = []
            for i, (f, g) in enumerate(zip(filtered, golds)):
                answer = _first(f)
                if metric == "exact_match":
                    v = float(any(M.exact_match(answer, ref, **options) for ref in g))
                elif metric == "f1":
                    v = max(M.token_f1(answer, ref) for ref in g)
                else:  # check
                    if task.checker is None:
                        raise EvalError(f"{task.source}: metric `check` needs a task with a checker function "
                                        "(built-in tasks have one)")
                    v = float(task.checker(p.docs[i], answer))
                values.append(v)
                samples[i][key] = v
            aggregates[key] = (values, M.mean)
    return samples, aggregates


def _first(filtered: list) -> str:
    return str(filtered[0]) if filtered else ""


def _gold_text(task: Task, p: Prepared, i: int) -> list[str]:
    """The reference answers of a document: the target, or the choice it indexes."""
    target = p.targets[i]
    if p.choices is not None:
        g = gold_index(task, target, p.choices[i], p.where[i])
        return [p.choices[i][j] for j in (g if isinstance(g, list) else [g])]
    if isinstance(target, list):
        return [str(t) for t in target]
    if target is None:
        return [""]
    return [str(target)]


def apply_filter(flt: Filter, responses: list[str]) -> list[str]:
    """A response list through a filter pipeline (the harness's filter functions)."""
    from llmlab.generate.prompting import extract_answer, majority_vote

    out = list(responses)
    for name, options in flt.steps:
        if name == "regex":
            pattern = re.compile(options.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
            group, fallback = int(options.get("group_select", 0)), options.get("fallback", "[invalid]")
            picked = []
            for r in out:
                found = pattern.findall(r if isinstance(r, str) else "")
                if not found:
                    picked.append(fallback)
                    continue
                m = found[group] if -len(found) <= group < len(found) else found[0]
                if isinstance(m, tuple):
                    m = next((x for x in m if x), fallback)
                picked.append(m.strip())
            out = picked
        elif name == "take_first":
            out = out[:1]
        elif name == "take_first_k":
            out = out[:int(options.get("k", 1))]
        elif name == "remove_whitespace":
            out = [r.strip() for r in out]
        elif name == "lowercase":
            out = [r.lower() for r in out]
        elif name == "uppercase":
            out = [r.upper() for r in out]
        elif name == "majority_vote":  # self-consistency's vote: the most frequent, ties to the first seen
            out = [majority_vote(out)[0]] if out else out
        elif name == "extract_answer":  # llmlab's: "The answer is X", else the last number
            out = [extract_answer(r) or "[invalid]" for r in out]
    return out


def _pass_at_k(task: Task, p: Prepared, filtered: list[list[str]], options: dict, aggregates, samples,
               suffix: str, code_timeout: float) -> None:
    from llmlab.eval.coderun import Limits, pass_at_k, run_many

    if task.tests is None:
        raise EvalError(f"{task.source}: metric pass_at_k needs a task whose documents carry unit tests")
    ks = options.get("k", [1])
    ks = [ks] if isinstance(ks, int) else list(ks)
    runs = [(_program(p, i, answer), task.tests(p.docs[i])) for i, answers in enumerate(filtered) for answer in answers]
    outcomes = run_many(runs, Limits(timeout=code_timeout))
    at = 0
    per_doc = []
    for i, answers in enumerate(filtered):
        got = outcomes[at:at + len(answers)]
        at += len(answers)
        per_doc.append((len(answers), sum(o.passed for o in got)))
        samples[i]["tests"] = [o.status for o in got]
    for k in ks:
        if any(n < k for n, _ in per_doc):
            raise EvalError(f"{task.source}: pass@{k} needs at least {k} samples per problem; set repeats >= {k}")
        values = [pass_at_k(n, c, k) for n, c in per_doc]
        for s, v in zip(samples, values):
            s[f"pass@{k}{suffix}"] = v
        aggregates[f"pass@{k}{suffix}"] = (values, M.mean)


def _program(p: Prepared, i: int, answer: str) -> str:
    """A code task's program: the prompt (signature and docstring) completed by the answer, unless
    the answer restates the whole function."""
    from llmlab.eval.coderun import extract_code

    code = extract_code(answer)
    prompt = p.docs[i].get("prompt", p.texts[i])
    return code if code.lstrip().startswith(("def ", "import ", "from ")) else prompt + code
