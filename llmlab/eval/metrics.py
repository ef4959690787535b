"""Metrics: pure functions of predictions, references and log-likelihoods.

Per-sample scores (`exact_match`, `token_f1`, `choice_scores`) feed corpus-level aggregates
(`mean`, `perplexity`, `bits_per_byte`, `expected_calibration_error`, `classification_report`,
`bleu`, `rouge`), and `bootstrap_stderr` gives any aggregate its standard error. The definitions
follow lm-evaluation-harness where it has one, so that llmlab's scores and its agree.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

# --------------------------------------------------------------------------- per sample


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
                ignore_numbers: bool = False, regexes_to_ignore: Sequence[str] = (),
                ignore_whitespace: bool = False) -> bool:
    """Equal strings after the optional normalisations, in lm-evaluation-harness's order: the regexes
    are deleted, then case, punctuation and digits; `ignore_whitespace` (llmlab's own) also strips
    both ends and collapses each internal whitespace run to one space."""
    for pattern in regexes_to_ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for flag, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if flag:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_whitespace:
        prediction, reference = " ".join(prediction.split()), " ".join(reference.split())
    return prediction == reference


def _normalize_words(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def squad_exact_match(prediction: str, reference: str) -> bool:
    """SQuAD's exact match: equal after lowercasing and dropping punctuation, articles and extra
    whitespace (Rajpurkar et al. 2016's evaluation script)."""
    return _normalize_words(prediction) == _normalize_words(reference)


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 of SQuAD (Rajpurkar et al. 2016): 2PR / (P + R) over the bags of normalised
    words; 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = _normalize_words(prediction), _normalize_words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def choice_scores(logliks: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> dict[str, float]:
    """Multiple choice scored by log-likelihood (Brown et al. 2020): `acc` takes the most likely
    choice; `acc_norm` divides each log-likelihood by the choice's length in characters (as
    lm-evaluation-harness does) so long answers are not penalised for their length; `brier_score`
    is sum_i (p_i - [i = gold])^2 over the softmax of the log-likelihoods. With several gold
    indices, a prediction is right if it is any of them."""
    golds = {gold} if isinstance(gold, int) else set(gold)
    pred = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    pred_norm = max(range(len(logliks)), key=lambda i: (logliks[i] / max(len(choices[i]), 1), -i))
    top = max(logliks)
    weights = [math.exp(x - top) for x in logliks]
    probs = [w / sum(weights) for w in weights]
    first = min(golds)
    brier = sum((p - (i == first)) ** 2 for i, p in enumerate(probs))
    return {"acc": float(pred in golds), "acc_norm": float(pred_norm in golds), "brier_score": brier,
            "confidence": max(probs), "pred": pred}


# --------------------------------------------------------------------------- aggregates


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def perplexity(logliks: Sequence[float], units: Sequence[int]) -> float:
    """exp(-sum log p / sum units): per token, word or byte, depending on what `units` count."""
    return math.exp(min(-sum(logliks) / max(sum(units), 1), 700.0))


def bits_per_byte(logliks: Sequence[float], n_bytes: Sequence[int]) -> float:
    """-sum log p / (sum bytes * ln 2): compressed size in bits per byte of text, comparable across
    tokenizers (Gao et al. 2020, "The Pile")."""
    return -sum(logliks) / max(sum(n_bytes), 1) / math.log(2)


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of |accuracy - confidence|
    weighted by the bin's share of samples. 0 for a perfectly calibrated model."""
    if not confidences:
        return float("nan")
    totals: dict[int, list[float]] = {}
    for conf, ok in zip(confidences, correct):
        b = min(int(conf * bins), bins - 1)
        totals.setdefault(b, [0.0, 0.0, 0.0])
        totals[b][0] += 1
        totals[b][1] += conf
        totals[b][2] += ok
    n = len(confidences)
    return sum(count / n * abs(acc / count - conf / count) for count, conf, acc in totals.values())


def classification_report(golds: Sequence[str], preds: Sequence[str]) -> dict:
    """Precision, recall and F1 per label, their macro averages, accuracy and the confusion matrix
    (`confusion[gold][pred]` counts), labels in sorted order."""
    labels = sorted(set(golds) | set(preds))
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(golds, preds):
        confusion[g][p] += 1
    per_label = {}
    for label in labels:
        tp = confusion[label][label]
        predicted = sum(confusion[g][label] for g in labels)
        actual = sum(confusion[label].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {"accuracy": mean([float(g == p) for g, p in zip(golds, preds)]),
            "macro_precision": mean([v["precision"] for v in per_label.values()]),
            "macro_recall": mean([v["recall"] for v in per_label.values()]),
            "macro_f1": mean([v["f1"] for v in per_label.values()]),
            "labels": per_label, "confusion": confusion}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (Papineni et al. 2002) from sacrebleu, 0-100, one reference per prediction."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Lin 2004) from rouge-score, 0-1, with stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {k: mean([s[k].fmeasure for s in scores]) for k in ("rouge1", "rouge2", "rougeL")}


def bootstrap_stderr(samples: Sequence, aggregate: Callable[[Sequence], float], iters: int = 1000,
                     seed: int = 1234) -> float:
    """Standard error of `aggregate(samples)` by the bootstrap (Efron 1979): the standard deviation
    of the aggregate over `iters` resamples with replacement, drawn from `seed`. 0 for fewer than
    two samples or iters < 2."""
    n = len(samples)
    if n < 2 or iters < 2:
        return 0.0
    rng = random.Random(seed)
    values = [aggregate([samples[rng.randrange(n)] for _ in range(n)]) for _ in range(iters)]
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
