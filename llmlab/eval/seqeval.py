"""Entity-level scores of BIO (IOB2) sequence labelling, as the seqeval package computes them in its
default mode, which follows CoNLL's conlleval script (Tjong Kim Sang & Buchholz 2000).

An entity is a maximal chunk of one type: it starts at B-X, or at an I-X that does not continue
an entity of type X (after O, or after another type), and goes on over the I-X tags that follow.
A predicted entity counts only when its type, start and end all equal a gold one's. Entities
never cross sentences. SQuAD's exact match and token F1 live in `llmlab.eval.metrics`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

Entity = tuple[str, int, int]  # (type, first token, last token)


def entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one tagged sentence, in order: `["B-PER", "I-PER", "O", "I-LOC"]` holds
    ("PER", 0, 1) and ("LOC", 3, 3).

    Raises:
        ValueError: a tag that is not O, B-TYPE or I-TYPE.
    """
    found: list[Entity] = []
    kind: str | None = None  # the type of the entity open at the previous tag
    start = 0
    for i, tag in enumerate(tags):
        prefix, _, type_ = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not type_):
            raise ValueError(f"tag {tag!r} at position {i}: expected O, B-TYPE or I-TYPE")
        if kind is not None and (prefix != "I" or type_ != kind):
            found.append((kind, start, i - 1))
            kind = None
        if tag != "O" and kind is None:
            kind, start = type_, i
    if kind is not None:
        found.append((kind, start, len(tags) - 1))
    return found


def _prf(correct: int, predicted: int, actual: int) -> dict[str, float]:
    """Precision, recall and F1, each 0 when its denominator is (seqeval's zero_division=0)."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str]]) -> dict:
    """Entity-level precision, recall and F1 of predicted tag sequences against gold ones.

    Args:
        golds, preds: One tag sequence per sentence, the two alike in shape.

    Returns:
        {"precision", "recall", "f1"}: micro averages over all entities; "macro_f1": the mean of
        the per-type F1s; "accuracy": the share of tokens tagged right; "support": gold entities;
        "predicted": predicted entities; "types": {type: {"precision", "recall", "f1", "support"}}
        for every type gold or predicted, sorted.

    Raises:
        ValueError: the shapes differ, or a tag is not O, B-TYPE or I-TYPE.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold sentences but {len(preds)} predicted")
    for s, (gold, pred) in enumerate(zip(golds, preds)):
        if len(gold) != len(pred):
            raise ValueError(f"sentence {s}: {len(gold)} gold tags but {len(pred)} predicted")
    gold_set = {(s, *e) for s, tags in enumerate(golds) for e in entities(tags)}
    pred_set = {(s, *e) for s, tags in enumerate(preds) for e in entities(tags)}
    correct = gold_set & pred_set
    by_type = [Counter(e[1] for e in group) for group in (correct, pred_set, gold_set)]
    types = {t: {**_prf(by_type[0][t], by_type[1][t], by_type[2][t]), "support": by_type[2][t]}
             for t in sorted(by_type[1].keys() | by_type[2].keys())}
    tokens = sum(len(tags) for tags in golds)
    right = sum(g == p for gold, pred in zip(golds, preds) for g, p in zip(gold, pred))
    return {**_prf(len(correct), len(pred_set), len(gold_set)),
            "macro_f1": sum(v["f1"] for v in types.values()) / len(types) if types else 0.0,
            "accuracy": right / tokens if tokens else 0.0,
            "support": len(gold_set), "predicted": len(pred_set), "types": types}
