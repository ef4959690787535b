"""Metrics against hand-computed values, and the one validation-loss definition."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.eval import metrics as M
from llmlab.eval.loss import token_loss
from llmlab.models import LlamaConfig, build_model


def test_exact_match_options_in_the_harness_order():
    assert M.exact_match("Paris", "Paris") and not M.exact_match("paris", "Paris")
    assert M.exact_match("paris", "Paris", ignore_case=True)
    assert M.exact_match("Paris!", "Paris", ignore_punctuation=True)
    assert M.exact_match("abc 12", "abc ", ignore_numbers=True)
    assert M.exact_match("The answer: 4", "4", regexes_to_ignore=[r"^The answer: "])
    assert M.exact_match("  5 1\t8\n3 ", "5 1 8 3", ignore_whitespace=True)
    assert not M.exact_match("5183", "5 1 8 3", ignore_whitespace=True)


def test_token_f1_is_squads():
    assert M.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0 and M.token_f1("dog", "cat") == 0.0


def test_choice_scores_by_loglikelihood_and_length():
    s = M.choice_scores([-2.0, -3.0, -9.0], ["a", "bbbbbb", "c"], gold=1)
    assert s["acc"] == 0.0 and s["pred"] == 0
    assert s["acc_norm"] == 1.0  # -3/6 = -0.5 beats -2/1
    p = [math.exp(x) for x in (-2.0, -3.0, -9.0)]
    p = [x / sum(p) for x in p]
    assert s["brier_score"] == pytest.approx(p[0] ** 2 + (p[1] - 1) ** 2 + p[2] ** 2)
    assert M.choice_scores([-1.0, -1.0], ["a", "b"], gold=0)["pred"] == 0  # ties go to the first, as argmax
    assert M.choice_scores([-5.0, -1.0], ["a", "b"], gold=[0, 1])["acc"] == 1.0


def test_perplexity_bits_per_byte_and_calibration():
    assert M.perplexity([-10.0, -20.0], [10, 20]) == pytest.approx(math.e)
    assert M.bits_per_byte([-math.log(2) * 8], [8]) == pytest.approx(1.0)
    assert M.expected_calibration_error([0.9, 0.9, 0.2], [1, 0, 0]) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.2)
    assert M.expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0


def test_classification_report_and_confusion():
    r = M.classification_report(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert r["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"a": 0, "b": 2}}
    assert r["labels"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["labels"]["b"]["precision"] == pytest.approx(2 / 3) and r["accuracy"] == 0.75
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_bleu_and_rouge_from_their_libraries():
    assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert M.bleu(["dog"], ["the cat sat on the mat"]) < 5
    r = M.rouge(["the cat sat"], ["the cat sat down"])
    assert r["rouge1"] == pytest.approx(2 * 1.0 * 0.75 / 1.75) and r["rougeL"] == r["rouge1"]


def test_bootstrap_stderr_matches_the_standard_error_of_a_mean():
    values = [float(i % 2) for i in range(400)]  # p = 0.5: standard error sqrt(p(1-p)/n) = 0.025
    assert M.bootstrap_stderr(values, M.mean, iters=2000) == pytest.approx(0.025, rel=0.1)
    assert M.bootstrap_stderr([1.0], M.mean) == 0.0
    assert M.bootstrap_stderr(values, M.mean, seed=3) == M.bootstrap_stderr(values, M.mean, seed=3)


def test_token_loss_weights_batches_by_their_target_tokens():
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    x = torch.randint(0, 64, (3, 16))
    full = {"input_ids": x, "targets": x.roll(-1, 1)}
    masked = {"input_ids": x, "targets": full["targets"].clone()}
    masked["targets"][:, 4:] = -100  # a batch of 12 target tokens against one of 48
    both = token_loss(model, [full, masked])
    with torch.no_grad():
        one, two = float(model(**full)), float(model(**masked))
    assert both.tokens == 48 + 12
    assert both.mean == pytest.approx((one * 48 + two * 12) / 60, rel=1e-6)  # not the mean of batch means
    assert both.perplexity == pytest.approx(math.exp(both.mean))
    assert model.training  # the caller's mode comes back
