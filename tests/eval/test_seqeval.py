"""Entity-level scores of BIO tagging: chunks on tricky sequences computed by hand, and every score
equal to the seqeval package's on random sequences when it is installed."""

from __future__ import annotations

import importlib.util
import random
import warnings

import pytest

from llmlab.eval.seqeval import entities, entity_scores


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),  # the last entity ends with the sentence
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),  # I- after O starts an entity
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change starts another
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),  # B- always starts one
    (["I-ORG", "B-ORG", "O", "O", "I-ORG"], [("ORG", 0, 0), ("ORG", 1, 1), ("ORG", 4, 4)]),
    (["B-PER", "I-PER", "I-PER"], [("PER", 0, 2)]),  # trailing entity
    (["B-MISC-X", "I-MISC-X"], [("MISC-X", 0, 1)]),  # the type is all after the first dash
    (["O", "O"], []),
    ([], []),
])
def test_entities_are_maximal_chunks(tags, expected):
    assert entities(tags) == expected


@pytest.mark.parametrize("tag", ["PER", "E-PER", "B-", "I", "o"])
def test_a_tag_outside_bio_is_refused(tag):
    with pytest.raises(ValueError, match=f"tag '{tag}' at position 1: expected O, B-TYPE or I-TYPE"):
        entities(["O", tag])


def test_scores_computed_by_hand():
    golds = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"], ["B-LOC", "O"]]
    preds = [["B-PER", "I-PER", "O", "I-LOC"],  # I-LOC after O is the LOC entity (3, 3): right
             ["O", "B-ORG", "O", "B-PER"],  # ORG cut short: wrong; a spurious PER
             ["B-LOC", "I-LOC"]]  # LOC one token too long: wrong
    scores = entity_scores(golds, preds)
    # gold: PER, LOC, ORG, LOC (4); predicted: PER, LOC, ORG, PER, LOC (5); right: PER, LOC (2)
    assert scores["support"] == 4 and scores["predicted"] == 5
    assert scores["precision"] == pytest.approx(2 / 5) and scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 5) * (2 / 4) / (2 / 5 + 2 / 4))
    assert scores["types"] == {
        "LOC": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PER": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}}
    assert scores["macro_f1"] == pytest.approx((0.5 + 0 + 2 / 3) / 3)
    assert scores["accuracy"] == pytest.approx(6 / 10)  # 3 of 4, 2 of 4 and 1 of 2 tokens


def test_entities_never_cross_sentences():
    # joined, the gold I-PER would continue the PER before it (one entity, no match); apart it is its own
    scores = entity_scores([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])
    assert (scores["support"], scores["predicted"], scores["f1"]) == (2, 2, 1.0)


def test_perfect_empty_and_mismatched():
    tags = [["B-PER", "I-PER", "O"], ["B-LOC"]]
    assert entity_scores(tags, tags)["f1"] == 1.0
    none = entity_scores([["O", "O"]], [["O", "O"]])
    assert (none["f1"], none["types"], none["accuracy"]) == (0.0, {}, 1.0)
    with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
        entity_scores(tags, tags[:1])
    with pytest.raises(ValueError, match="sentence 1: 1 gold tags but 2 predicted"):
        entity_scores(tags, [tags[0], ["B-LOC", "O"]])


def _random_tags(rng: random.Random, n: int) -> list[str]:
    pool = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-MISC"]
    return [rng.choice(pool) for _ in range(n)]


@pytest.mark.skipif(importlib.util.find_spec("seqeval") is None, reason="needs the seqeval package")
def test_scores_equal_the_seqeval_package():
    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    cases = 0
    for _ in range(200):
        golds = [_random_tags(rng, rng.randint(1, 9)) for _ in range(rng.randint(1, 4))]
        preds = [_random_tags(rng, len(g)) if rng.random() < 0.7 else list(g) for g in golds]
        for tags in golds:
            assert entities(tags) == [tuple(e) for e in get_entities(tags)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when a type has no gold or no predicted entity
            ref = classification_report(golds, preds, output_dict=True, zero_division=0)
        ours = entity_scores(golds, preds)
        micro = ref.pop("micro avg")
        macro = ref.pop("macro avg")
        ref.pop("weighted avg")
        assert ours["types"].keys() == ref.keys()
        for kind, row in ref.items():
            assert ours["types"][kind] == pytest.approx({"precision": row["precision"], "recall": row["recall"],
                                                         "f1": row["f1-score"], "support": row["support"]})
        assert [ours["precision"], ours["recall"], ours["f1"], ours["support"]] == pytest.approx(
            [micro["precision"], micro["recall"], micro["f1-score"], micro["support"]])
        if ref:
            assert ours["macro_f1"] == pytest.approx(macro["f1-score"])
        assert ours["accuracy"] == pytest.approx(accuracy_score(golds, preds))
        cases += bool(ref)
    assert cases > 150  # most cases hold entities
